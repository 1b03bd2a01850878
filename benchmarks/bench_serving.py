"""Serving round-trip benchmark: concurrent PolicyClients against a PolicyServer on loopback.

Measures transport overhead (packing, websocket, validation, queueing) around a trivial policy, so the
numbers are what the server adds on top of the model. Run `python benchmarks/bench_serving.py --help`.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import numpy as np

from sensorvla.serving.client import PolicyClient
from sensorvla.serving.server import PolicyServer

H, D_A = 8, 7


class _EchoPolicy:
    """Validates like a real policy, sleeps `infer_ms`, returns a zero (H, D_a) chunk."""

    metadata = {"name": "bench-echo", "action_horizon": H, "action_dim": D_A}
    observation_spec = {"sensor": ((None,), "f"), "state": ((D_A,), "f"), "instruction": ((), "U")}

    def __init__(self, infer_ms: float):
        self.infer_s = infer_ms / 1e3

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        if self.infer_s:
            time.sleep(self.infer_s)
        return {"actions": np.zeros((H, D_A), np.float32), "timing": {}}


def _obs(payload_bytes: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "sensor": rng.standard_normal(max(1, payload_bytes // 4)).astype(np.float32),
        "state": np.zeros(D_A, np.float32),
        "instruction": "benchmark",
    }


def run(
    num_clients: int = 4,
    requests: int = 50,
    payload_sizes: tuple[int, ...] = (1_000, 100_000, 2_700_000),
    infer_ms: float = 0.0,
    warmup: int = 2,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Run `num_clients` threads x `requests` round trips for each payload size; return latency stats.

    Args:
        num_clients: concurrent clients (one thread and one connection each).
        requests: timed requests per client and payload size (after `warmup` untimed ones).
        payload_sizes: approximate request sizes in bytes (a float32 sensor vector of that many bytes).
        infer_ms: simulated model time per request (the server serializes inference, so latency grows
            with `num_clients * infer_ms`).
        warmup: untimed requests per client before timing.
        timeout_s: bound on each payload size's run; a stuck run raises TimeoutError.

    Returns:
        `{"num_clients", "requests", "infer_ms", "rows": [{"payload_bytes", "p50_ms", "p99_ms", "mean_ms",
        "max_ms", "server_total_p50_ms", "throughput_rps"}, ...]}`; latencies are client-side round trips.
    """
    if num_clients < 1 or requests < 1:
        raise ValueError("num_clients and requests must be >= 1")
    rows = []
    limit = max(payload_sizes) * 2 + 2**20
    with PolicyServer(_EchoPolicy(infer_ms), max_message_bytes=limit, log_every=10**9) as server:
        for size in payload_sizes:
            obs = _obs(size)
            latencies: list[list[float]] = [[] for _ in range(num_clients)]
            server_ms: list[list[float]] = [[] for _ in range(num_clients)]
            errors: list[BaseException] = []
            barrier = threading.Barrier(num_clients)

            def client_loop(i: int, obs=obs, latencies=latencies, server_ms=server_ms, errors=errors, barrier=barrier):
                try:
                    with PolicyClient(port=server.port, timeout=timeout_s, connect_timeout=timeout_s) as client:
                        for _ in range(warmup):
                            client.infer(obs)
                        barrier.wait(timeout=timeout_s)
                        for _ in range(requests):
                            t0 = time.perf_counter()
                            reply = client.infer(obs)
                            latencies[i].append((time.perf_counter() - t0) * 1e3)
                            server_ms[i].append(reply["server_timing"]["total_ms"])
                except BaseException as exc:  # re-raised in the main thread below
                    errors.append(exc)

            threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(num_clients)]
            t_start = time.perf_counter()
            for t in threads:
                t.start()
            deadline = time.monotonic() + timeout_s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            wall = time.perf_counter() - t_start
            if any(t.is_alive() for t in threads):
                raise TimeoutError(f"serving benchmark (payload {size} B) did not finish in {timeout_s}s")
            if errors:
                raise errors[0]
            lat = np.concatenate([np.asarray(x) for x in latencies])
            srv = np.concatenate([np.asarray(x) for x in server_ms])
            p50, p99 = np.percentile(lat, [50, 99])
            rows.append(
                {
                    "payload_bytes": int(obs["sensor"].nbytes),
                    "p50_ms": float(p50),
                    "p99_ms": float(p99),
                    "mean_ms": float(lat.mean()),
                    "max_ms": float(lat.max()),
                    "server_total_p50_ms": float(np.percentile(srv, 50)),
                    "throughput_rps": float(lat.size / wall),
                }
            )
    return {"num_clients": num_clients, "requests": requests, "infer_ms": infer_ms, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    """The result of `run` as a fixed-width text table."""
    cols = ("p50 ms", "p99 ms", "mean ms", "max ms", "srv p50", "req/s")
    head = f"{'payload':>10} " + " ".join(f"{c:>8}" for c in cols)
    lines = [
        f"serving round trip: {result['num_clients']} clients x {result['requests']} requests, "
        f"infer {result['infer_ms']} ms",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['payload_bytes']:>10} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['mean_ms']:>8.2f} "
            f"{r['max_ms']:>8.2f} {r['server_total_p50_ms']:>8.2f} {r['throughput_rps']:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--sizes", default="1000,100000,2700000", help="comma-separated payload sizes (bytes)")
    parser.add_argument("--infer-ms", type=float, default=0.0, help="simulated model time per request")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    result = run(args.clients, args.requests, sizes, infer_ms=args.infer_ms, timeout_s=args.timeout_s)
    print(format_table(result))


if __name__ == "__main__":
    main()
