"""Hostile-client benchmark (issue 19): how long other clients wait while one sends the messages that used to stall
the server, and how much memory 16 concurrent maximum-size frames take.

A real `sensorvla serve` process (a tiny untrained checkpoint, default bounds) is measured from outside:
  - stall: a bystander client sends small valid requests in a loop, first alone (baseline), then while a hostile
    client sends, one after another, a valid observation plus 1,000,000 unknown keys (9 MB), one 30 M-character key,
    a 30 M-int `state` list, and the fuzz test's hostile classes (special tokens, clocks in ms, huge maps, long
    keys, nested lists). Reported: the bystander's round trips (p50 / p99 / max) in both phases, and each hostile
    message's reply (type, size, round trip). The goal: no bystander round trip over 250 ms.
  - memory: 16 clients send a maximum-size frame at once (a float32 `sensor` array filling the message cap); the
    server's resident memory is sampled every 2 ms from /proc. Measured with the default in-flight budget and with a
    budget large enough for all 16 (what the server did before the budget), against the documented bound
    `2 x max_connections x max_message_bytes + 2 x max_inflight_bytes` over the idle server (docs/serving.md).
Run `python benchmarks/run.py hostile` or `python benchmarks/bench_hostile.py --help`. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from _scratch import scratch_dir

HERE = Path(__file__).resolve().parent
MIB = 2**20
GOAL_MS = 250.0


def _payloads_module():
    path = HERE.parent / "tests" / "serving" / "fuzz_payloads.py"
    spec = importlib.util.spec_from_file_location("fuzz_payloads", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """`sensorvla serve` in a subprocess; `with Server(ckpt, flags) as s:` waits for /healthz."""

    def __init__(self, checkpoint: Path, flags: list[str]):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "sensorvla.cli", "serve", "--checkpoint", str(checkpoint)]
        cmd += ["--port", str(self.port), *flags]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark server did not start") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _hostile_frames(fp, shape, protocol) -> dict[str, bytes]:
    """name -> frame, built as bytes where the size itself is the attack (no 30 M-element Python list here)."""
    obs = fp.valid_obs(shape, seed=3, side=32, rows=20)
    base = protocol.packb(obs)  # a fixmap of 6 keys
    n_keys = 1_000_000
    extra = b"".join(protocol.packb(f"k{i}") + b"\x00" for i in range(n_keys))
    frames = {
        "1,000,000 unknown keys": b"\xdf" + (6 + n_keys).to_bytes(4, "big") + base[1:] + extra,
        "30 M-character key": b"\xdf" + (7).to_bytes(4, "big") + base[1:] + b"\xdb"
        + (30_000_000).to_bytes(4, "big") + b"k" * 30_000_000 + b"\x00",
        "30 M-int state list": protocol.packb({**obs, "state": "PLACEHOLDER"}).replace(
            b"\xabPLACEHOLDER", b"\xdd" + (30_000_000).to_bytes(4, "big") + b"\x01" * 30_000_000
        ),
    }  # fmt: skip
    import hypothesis.strategies as st  # noqa: F401 - fuzz_payloads needs hypothesis

    rng = np.random.default_rng(0)
    mutations = fp._mutations(shape)  # noqa: SLF001 - the fuzz test's own hostile classes
    for name in ("huge map", "long key", "long state list", "nested lists", "special token instruction",
                 "sensor stamps in ms", "query time in ms", "all after the query"):  # fmt: skip
        out = mutations[name][1](fp.valid_obs(shape, seed=4, side=32, rows=20), rng)
        frames[f"fuzz: {name}"] = protocol.packb(out)
    return frames


def _bystander(port: int, seed: int, stop_file: str) -> None:
    """In its own process (so the hostile sender's packing and masking never hold its GIL): small valid requests
    until `stop_file` exists, then the round trips in ms as JSON on stdout."""
    import json

    from sensorvla.serving.client import PolicyClient

    fp = _payloads_module()
    out: list[float] = []
    with PolicyClient(port=port, timeout=120, connect_timeout=60) as client:
        obs = fp.valid_obs(fp.Shape.from_metadata(client.metadata), seed=seed, side=32, rows=40)
        client.infer(obs)  # warm up
        while not os.path.exists(stop_file):
            t0 = time.perf_counter()
            client.infer(obs)  # the same query time again: allowed, the samples are de-duplicated
            out.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps(out))


class Bystander:
    """`with Bystander(port) as b:` runs `_bystander` in a subprocess; `b.ms` holds its round trips afterwards."""

    def __init__(self, port: int):
        self.stop_file = tempfile.mktemp(prefix="sensorvla_bystander_stop_")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--bystander", str(port), self.stop_file]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.ms: list[float] = []

    def __enter__(self) -> Bystander:
        time.sleep(3.0)  # connected and warmed up (its first requests are not counted against the goal)
        return self

    def __exit__(self, *exc: object) -> None:
        import json

        Path(self.stop_file).touch()
        out, _ = self.proc.communicate(timeout=300)
        Path(self.stop_file).unlink(missing_ok=True)
        self.ms = json.loads(out.strip().splitlines()[-1])


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max())}  # fmt: skip


def measure_stall(checkpoint: Path, fp, rounds: int = 3, baseline_s: float = 3.0) -> dict[str, Any]:
    """Bystander round trips alone, then while the hostile frames are sent `rounds` times."""
    from websockets.sync.client import connect

    from sensorvla.serving import protocol
    from sensorvla.serving.client import PolicyClient

    with Server(checkpoint, []) as srv, PolicyClient(port=srv.port, timeout=60) as probe:
        shape = fp.Shape.from_metadata(probe.metadata)
        frames = _hostile_frames(fp, shape, protocol)
        good = fp.valid_obs(shape, seed=1, side=32, rows=40)
        probe.infer(good)  # warm up
        with Bystander(srv.port) as alone:
            time.sleep(baseline_s)
        replies = []
        with (
            Bystander(srv.port) as during,
            connect(f"ws://127.0.0.1:{srv.port}", compression=None, proxy=None, max_size=None) as ws,
        ):
            ws.recv(timeout=60)
            for _ in range(rounds):
                for name, frame in frames.items():
                    t0 = time.perf_counter()
                    ws.send(frame)
                    raw = ws.recv(timeout=300)
                    reply = protocol.decode_reply(raw)
                    err = reply.get("error") or {}
                    ms = (time.perf_counter() - t0) * 1e3
                    replies.append({"name": name, "frame_bytes": len(frame), "reply_bytes": len(raw),
                                    "type": err.get("type", "ok"), "round_trip_ms": ms})  # fmt: skip
        baseline = alone.ms
        during = during.ms
    per_kind: dict[str, dict[str, Any]] = {}
    for r in replies:
        k = per_kind.setdefault(r["name"], {**r, "round_trip_ms": 0.0})
        k["round_trip_ms"] = max(k["round_trip_ms"], r["round_trip_ms"])
    silent = [r["name"] for r in replies if r["type"] == "ok"]
    return {"baseline": _stats(baseline), "during_hostile": _stats(during), "hostile": list(per_kind.values()),
            "silent_accepts": silent, "goal_ms": GOAL_MS, "goal_met": _stats(during)["max_ms"] <= GOAL_MS}  # fmt: skip


def measure_memory(checkpoint: Path, clients: int = 16, max_message_mb: float = 32.0,
                   inflight_mb: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Peak server RSS over idle while `clients` send a maximum-size frame at once."""
    from websockets.sync.client import connect

    from sensorvla.serving import protocol

    flags = ["--max-message-mb", str(max_message_mb)]
    if inflight_mb is not None:
        flags += ["--max-inflight-mb", str(inflight_mb)]
    with Server(checkpoint, flags) as srv:
        with connect(f"ws://127.0.0.1:{srv.port}", proxy=None, max_size=None) as ws:
            meta = protocol.unpackb(ws.recv(timeout=60))
        fp = _payloads_module()
        limit = int(meta["protocol"]["max_message_bytes"])
        obs = fp.valid_obs(fp.Shape.from_metadata(meta), seed=5, side=32, rows=0)
        channels = int(meta["sensor_channels"])
        rows = (limit - 64 * 1024) // (4 * channels + 8)  # decoded, cast to float32 and checked, then refused
        obs["sensor"] = np.ones((rows, channels), np.float32)
        obs["sensor_timestamps"] = float(obs["timestamp"]) - np.arange(rows)[::-1] * 1e-6
        frame = protocol.packb(obs)
        assert len(frame) <= limit, (len(frame), limit)
        conns = [connect(f"ws://127.0.0.1:{srv.port}", proxy=None, max_size=None) for _ in range(clients)]
        for c in conns:
            c.recv(timeout=60)
        time.sleep(1.0)
        idle = _rss_bytes(srv.proc.pid)
        peak, done = [idle], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(_rss_bytes(srv.proc.pid))
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        barrier = threading.Barrier(clients)
        types: list[str] = []

        def send(c) -> None:
            barrier.wait()
            c.send(frame)
            types.append((protocol.decode_reply(c.recv(timeout=300)).get("error") or {}).get("type", "ok"))

        threads = [threading.Thread(target=send, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.2)
        done.set()
        sampler.join()
        for c in conns:
            c.close()
        budget = int(meta["protocol"]["max_inflight_bytes"])
        max_conn = int(meta["protocol"]["max_connections"])
    bound = 2 * max_conn * limit + 2 * budget  # docs/serving.md, "Memory"
    return {"clients": clients, "frame_bytes": len(frame), "max_inflight_bytes": budget,
            "max_connections": max_conn, "idle_rss_mb": idle / MIB, "peak_over_idle_mb": (max(peak) - idle) / MIB,
            "documented_bound_mb": bound / MIB, "within_bound": max(peak) - idle <= bound,
            "replies": {t: types.count(t) for t in sorted(set(types))}}  # fmt: skip


def run(rounds: int = 3) -> dict[str, Any]:
    """Build a tiny checkpoint, then measure the stall and the memory; see the module docstring."""
    import logging

    from sensorvla.world.synth import generate_dataset
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    logging.getLogger("sensorvla").setLevel(logging.ERROR)
    fp = _payloads_module()
    tmp = Path(scratch_dir("sensorvla_hostile_"))
    vl = build_tiny_qwen_vl(tmp / "vl")
    data = generate_dataset(tmp / "data", num_episodes=2, seed=0, progress=False)
    runner = fp.make_fuzz_runner(vl, data, tmp / "ckpt")
    ckpt = tmp / "ckpt" / "pretrained_model"
    del runner
    return {
        "stall": measure_stall(ckpt, fp, rounds=rounds),
        "memory_default_budget": measure_memory(ckpt),
        "memory_budget_for_all_16": measure_memory(ckpt, inflight_mb=16 * 32.0),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result of `run` as text lines."""
    s = result["stall"]
    b, d = s["baseline"], s["during_hostile"]
    lines = [
        f"bystander round trips alone:          p50 {b['p50_ms']:.1f} ms  p99 {b['p99_ms']:.1f} ms  max "
        f"{b['max_ms']:.1f} ms  ({b['n']} requests)",
        f"bystander while hostile frames arrive: p50 {d['p50_ms']:.1f} ms  p99 {d['p99_ms']:.1f} ms  max "
        f"{d['max_ms']:.1f} ms  ({d['n']} requests) -> goal max <= {s['goal_ms']:.0f} ms: "
        + ("met" if s["goal_met"] else "MISSED"),
        f"silent accepts of hostile frames: {len(s['silent_accepts'])}",
        f"{'hostile frame':<38} {'bytes':>11} {'reply':>7} {'type':<17} {'worst round trip':>16}",
    ]
    for h in s["hostile"]:
        name, size, reply, kind, ms = h["name"], h["frame_bytes"], h["reply_bytes"], h["type"], h["round_trip_ms"]
        lines.append(f"{name:<38} {size:>11} {reply:>7} {kind:<17} {ms:>13.1f} ms")
    for key in ("memory_default_budget", "memory_budget_for_all_16"):
        m = result[key]
        within = "within" if m["within_bound"] else "OVER"
        lines.append(
            f"{key}: {m['clients']} x {m['frame_bytes'] / MIB:.1f} MiB frames, budget "
            f"{m['max_inflight_bytes'] / MIB:.0f} MiB: idle {m['idle_rss_mb']:.0f} MiB, peak "
            f"+{m['peak_over_idle_mb']:.0f} MiB (documented bound +{m['documented_bound_mb']:.0f} MiB: {within}); "
            f"replies {m['replies']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="times each hostile frame is sent")
    parser.add_argument("--bystander", nargs=2, metavar=("PORT", "STOP_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bystander:
        _bystander(int(args.bystander[0]), 1, args.bystander[1])
        return
    print(format_table(run(args.rounds)))


if __name__ == "__main__":
    main()
