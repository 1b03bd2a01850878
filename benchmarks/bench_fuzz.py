"""Serving fuzz benchmark: 10,000 hypothesis-drawn payloads from several connections against a real server
with a real (tiny, untrained) runner; prints the counts: ok / rejected by kind / busy / crashes / NaN.

The payloads and the rules a reply must follow are the fuzz test's (`tests/serving/fuzz_payloads.py`).
Run `python benchmarks/run.py fuzz` or `python benchmarks/bench_fuzz.py --help`.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import logging
import queue
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from _scratch import scratch_dir

HERE = Path(__file__).resolve().parent
STOP = object()


def _payloads_module():
    path = HERE.parent / "tests" / "serving" / "fuzz_payloads.py"
    spec = importlib.util.spec_from_file_location("fuzz_payloads", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def _violation(message: str) -> str:
    """AssertionError text from `judge` -> a counted category."""
    for key, name in (
        ("non-finite", "nan_or_inf"),
        ("actions for a malformed", "actions_for_malformed"),
        ("valid request refused", "valid_refused"),
        ("unexpected error", "unexpected_error_type"),
        ("text frame", "text_reply"),
    ):
        if key in message:
            return name
    return "bad_reply"


def run(payloads: int = 10_000, connections: int = 4, max_queue: int = 2, timeout_s: float = 60.0) -> dict[str, Any]:
    """Send `payloads` fuzz cases over `connections` concurrent connections; return the counts.

    Returns:
        `{"payloads", "connections", "seconds", "outcomes": {ok, <error type>: n}, "by_expectation": {...},
        "violations": {category: n}, "crashes": n, "hangs": n, "nan_replies": n, "healthy_after": bool,
        "examples": [first violation messages]}`.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from websockets.sync.client import connect

    from sensorvla.serving import protocol
    from sensorvla.serving.server import PolicyServer
    from sensorvla.world.synth import generate_dataset
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    fp = _payloads_module()
    logging.getLogger("sensorvla.serving.server").setLevel(logging.ERROR)  # one warning per rejected payload
    tmp = Path(scratch_dir("sensorvla_fuzz_"))
    vl = build_tiny_qwen_vl(tmp / "vl")
    data = generate_dataset(tmp / "data", num_episodes=4, seed=0, progress=False)
    runner = fp.make_fuzz_runner(vl, data, tmp / "ckpt")
    shape = fp.Shape.from_metadata(runner.metadata)
    work: queue.Queue = queue.Queue(maxsize=4 * connections)
    lock = threading.Lock()
    outcomes: collections.Counter[str] = collections.Counter()
    expectations: collections.Counter[str] = collections.Counter()
    violations: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    failures = {"crashes": 0, "hangs": 0}
    reset = protocol.packb({protocol.CONTROL_KEY: protocol.CONTROL_RESET})

    def one(ws, case) -> bool:
        """Send one case on `ws`; False when the connection is gone (then reconnect)."""
        try:
            ws.send(reset)
            ws.recv(timeout=timeout_s)
            ws.send(case.payload)
            outcome = fp.judge(case, ws.recv(timeout=timeout_s))
            with lock:
                outcomes[outcome] += 1
                expectations[case.expect] += 1
        except AssertionError as exc:
            with lock:
                violations[_violation(str(exc))] += 1
                if len(examples) < 10:
                    examples.append(str(exc)[:300])
        except TimeoutError:
            with lock:
                failures["hangs"] += 1
            return False
        except Exception as exc:  # the connection died: the server crashed or closed it
            with lock:
                failures["crashes"] += 1
                if len(examples) < 10:
                    examples.append(f"{case.kind}: {type(exc).__name__}: {exc}"[:300])
            return False
        return True

    def worker(url: str) -> None:
        done = False
        while not done:
            with connect(url, compression=None, proxy=None, max_size=None, open_timeout=timeout_s) as ws:
                ws.recv(timeout=timeout_s)  # handshake
                while True:
                    case = work.get()
                    if case is STOP:
                        done = True
                        break
                    if not one(ws, case):
                        break

    with PolicyServer(runner, max_queue=max_queue, log_every=10**9, send_traceback=False).start() as server:
        url = f"ws://127.0.0.1:{server.port}"
        threads = [threading.Thread(target=worker, args=(url,), daemon=True) for _ in range(connections)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()

        @settings(
            max_examples=payloads,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=fp.fuzz_cases(shape))
        def produce(case) -> None:
            work.put(case)

        with warnings.catch_warnings():
            # The server's and the clients' threads use the `random` module while Hypothesis draws here (its check
            # sees the global state move); the strategies themselves draw only from Hypothesis and seeded numpy.
            warnings.filterwarnings("ignore", message="Do not use the `random` module inside strategies")
            produce()
        for _ in threads:
            work.put(STOP)
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as resp:
            healthy = resp.status == 200
    return {
        "payloads": sum(outcomes.values()) + sum(violations.values()) + sum(failures.values()),
        "connections": connections,
        "max_queue": max_queue,
        "seconds": seconds,
        "outcomes": dict(outcomes),
        "by_expectation": dict(expectations),
        "violations": dict(violations),
        "crashes": failures["crashes"],
        "hangs": failures["hangs"],
        "nan_replies": violations.get("nan_or_inf", 0),
        "healthy_after": healthy,
        "examples": examples,
    }


def format_table(result: dict[str, Any]) -> str:
    """The counts of `run` as text lines."""
    o = result["outcomes"]
    rejected = {k: v for k, v in sorted(o.items()) if k not in ("ok", "Busy")}
    lines = [
        f"serving fuzz: {result['payloads']} payloads over {result['connections']} connections "
        f"(max_queue={result['max_queue']}) in {result['seconds']:.1f} s",
        f"  ok (actions, finite)  {o.get('ok', 0)}",
        "  rejected by kind      " + ", ".join(f"{k} {v}" for k, v in rejected.items()),
        f"  busy                  {o.get('Busy', 0)}",
        f"  crashes               {result['crashes']}   hangs {result['hangs']}",
        f"  NaN/inf replies       {result['nan_replies']}",
        f"  other violations      {sum(v for k, v in result['violations'].items() if k != 'nan_or_inf')}",
        f"  healthy after         {result['healthy_after']}",
    ]
    lines += [f"  ! {e}" for e in result["examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=2)
    args = parser.parse_args(argv)
    print(format_table(run(args.payloads, args.connections, args.max_queue)))


if __name__ == "__main__":
    main()
