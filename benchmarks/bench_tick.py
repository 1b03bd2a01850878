"""The sensor-rate loop (fast-slow mode: VL features reused, the sensor encoder and head re-run every call) with the
per-call model work eager and compiled (`--runtime.compile`: `FastTick` exported and compiled by AOTInductor),
side by side in one process: blocks of calls alternate between the two runners, so a change of machine load hits
both alike. `python benchmarks/run.py tick [HEAD ...]` (default: regression); tiny model, 1 view, the current
thread setting (printed).

Reports per runner the loop Hz on the wall clock and on this process's CPU time, the per-stage p50, the first call's
compile time, and the largest difference of the compiled actions from the eager ones (absolute, and relative to the
largest action: an untrained diffusion head's DDIM actions reach thousands).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _scratch import scratch_dir

BLOCKS, CALLS = 20, 50  # alternating blocks of calls per runner
STAGES = ("preprocess_ms", "sensor_ms", "head_ms", "total_ms")


def _pair(tiny: Path, head: str):
    """(eager runner, compiled runner) over one policy, and an observation."""
    from sensorvla.eval.latency import _obs, _runner
    from sensorvla.inference.runner import PolicyRunner

    eager = _runner(str(tiny), head, 1, "fast_slow", "cpu", 33, 224, (10, 5))
    compiled = PolicyRunner(
        eager.policy,
        eager.cfg,
        eager.normalizer,
        eager.processor,
        vl_refresh_every=10_000,
        max_vl_age_s=1e9,
        compile_model=True,
    )
    return eager, compiled, _obs(1, 33, 224, np.random.default_rng(0))


def run_head(tiny: Path, head: str) -> dict[str, Any]:
    """One head: both runners, alternating blocks; Hz (wall, CPU), stage p50s, compile seconds, max |difference|."""
    eager, compiled, obs = _pair(tiny, head)
    want = eager.infer(obs)["actions"]
    t0 = time.perf_counter()
    got = compiled.infer(obs)["actions"]  # exports and compiles the tick
    compile_s = time.perf_counter() - t0
    runners = {"eager": eager, "compiled": compiled}
    for r in runners.values():
        for _ in range(CALLS):
            r.infer(obs)
    wall = dict.fromkeys(runners, 0.0)
    cpu = dict.fromkeys(runners, 0.0)
    stages: dict[str, dict[str, list[float]]] = {k: {s: [] for s in STAGES} for k in runners}
    for _ in range(BLOCKS):
        for name, r in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(CALLS):
                timing = r.infer(obs)["timing"]
                for s in STAGES:
                    stages[name][s].append(timing[s])
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    n = BLOCKS * CALLS
    diff = float(np.abs(got - want).max())
    row: dict[str, Any] = {"head": head, "compile_s": compile_s, "max_abs_diff": diff}
    row["max_rel_diff"] = diff / max(float(np.abs(want).max()), 1e-12)  # of the largest action value
    for name in runners:
        row[f"{name}_hz"] = n / wall[name]
        row[f"{name}_hz_cpu"] = n / cpu[name]
        for s in STAGES:
            row[f"{name}_{s[:-3]}_p50"] = float(np.median(stages[name][s]))
    row["speedup_cpu"] = row["compiled_hz_cpu"] / row["eager_hz_cpu"]
    return row


def run(heads: tuple[str, ...] = ("regression",)) -> list[dict[str, Any]]:
    """Every head in `heads`, on the embedded tiny model (built in a temp dir)."""
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    tiny = build_tiny_qwen_vl(Path(scratch_dir("bench_tick_")) / "tiny")
    return [run_head(tiny, h) for h in heads]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per head and runner the loop Hz (wall, CPU), stage p50s (ms); the CPU-time speedup."""
    threads = f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    lines = [
        threads,
        "",
        "| head | tick | Hz | Hz (CPU) | preprocess | sensor | head | total p50 ms | 1st call s | max diff (rel) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for name in ("eager", "compiled"):
            first = f"{r['compile_s']:.1f}" if name == "compiled" else "-"
            diff = f"{r['max_abs_diff']:.1e} ({r['max_rel_diff']:.0e})" if name == "compiled" else "-"
            lines.append(
                f"| {r['head']} | {name} | {r[f'{name}_hz']:.0f} | {r[f'{name}_hz_cpu']:.0f} | "
                f"{r[f'{name}_preprocess_p50']:.2f} | {r[f'{name}_sensor_p50']:.2f} | {r[f'{name}_head_p50']:.2f} | "
                f"{r[f'{name}_total_p50']:.2f} | {first} | {diff} |"
            )
    lines += ["", *(f"- {r['head']}: compiled / eager loop rate (CPU time) {r['speedup_cpu']:.2f}x" for r in rows)]
    return "\n".join(lines)
