"""Runner latency per stage (p50/p99), the head alone, and the fast-slow loop rate, on untrained policies.

One row per (config, threads, head, views, mode). End-to-end timings come from `PolicyRunner.infer`
(CUDA-synchronised per stage on a GPU); `head_alone` times `head.sample` on the conditioning of a real
observation (DDIM / flow with the `steps` given); `hz` is the calls per second of the runner loop (wall clock)
and `hz_cpu` the same from this process's CPU time (what one uncontended core would give; on a shared
machine wall-clock Hz also counts the time other processes held the core). Absolute numbers depend on the
machine; the ratios (`targets`) are measured side by side in one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorvla.runtime import bf16_autocast

STAGES = ("preprocess_ms", "vl_ms", "sensor_ms", "head_ms", "postprocess_ms", "total_ms")
DEFAULT_STEPS = (10, 5)  # DDIM steps (diffusion), Euler steps (flow): the goals' DDIM-10 / flow-5
# Tiny Qwen2.5-VL backbones (224 x 224 views) on which the VL share of a call is measured (`run_suite`,
# benchmarks/bench_train.py). "wide" (3.7 M parameters) was the goals' VL-dominant config until the image path
# got cheap: its VL pass is now ~80 % of a full regression call. "vl_dominant" (20 M parameters) has a VL pass of
# ~95 % of a full call, as a real backbone has (a 3B's is > 99 %); the goals' P1 and P3 are measured on it.
BACKBONES = {
    "wide": {"text_hidden": 256, "text_layers": 4, "vision_hidden": 128, "vision_depth": 4},
    "vl_dominant": {"text_hidden": 512, "text_layers": 6, "vision_hidden": 256, "vision_depth": 6},
}


def _runner(vl_model, head, views, mode, device, sensor_channels, image_size, steps, compile_model=False):
    from sensorvla.config import SensorVLAConfig
    from sensorvla.data.normalize import Normalizer, NormStats
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.models.backbone import load_processor
    from sensorvla.models.policy import build_policy

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_model)
    cfg.model.backbone.min_pixels = cfg.model.backbone.max_pixels = image_size * image_size
    cfg.model.head.type = head
    cfg.model.head.horizon, cfg.model.head.action_dim = 8, 7
    if head in ("diffusion", "flow"):
        cfg.model.head.num_inference_steps = steps[0] if head == "diffusion" else steps[1]
    cfg.model.sensor.channels = sensor_channels
    cfg.model.num_views, cfg.model.state_dim = views, 6
    cfg.data.views = tuple(f"view{i}" for i in range(views))
    # Module constructors draw from the global generator; fork it so the seeded init stays local and the
    # caller's random state is left exactly as it was (a library must not reseed its caller).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = build_policy(cfg, device=device)

    def ones(n: int) -> dict[str, np.ndarray]:  # identity normalization
        z, o = np.zeros(n, np.float32), np.ones(n, np.float32)
        return {"mean": z, "std": o, "q01": -o, "q99": o, "min": -o, "max": o}

    stats = NormStats(
        {"actions": ones(7), "state": ones(6), "sensor": ones(sensor_channels)},
        {"actions": 1, "state": 1, "sensor": 1},
        "latency-bench",
    )
    bb = cfg.model.backbone
    proc = load_processor(bb.vl_model, min_pixels=bb.min_pixels, max_pixels=bb.max_pixels)
    return PolicyRunner(
        policy,
        cfg,
        Normalizer(stats),
        proc,
        device=device,
        vl_refresh_every=10_000 if mode == "fast_slow" else 1,
        max_vl_age_s=1e9,
        **({"compile_model": True} if compile_model else {}),
    )


def _obs(views: int, channels: int, image_size: int, rng: np.random.Generator) -> dict[str, Any]:
    ts = np.arange(0, 0.2, 1 / 650.0)
    return {
        "images": rng.integers(0, 255, (views, image_size, image_size, 3), dtype=np.uint8),
        "state": rng.normal(size=6).astype(np.float32),
        "sensor": rng.normal(size=(len(ts), channels)).astype(np.float32),
        "sensor_timestamps": ts,
        "timestamp": np.float64(ts[-1]),
        "instruction": "insert the needle",
    }


def _head_calls(runner, obs: dict[str, Any]):
    """A no-argument function running `head.sample` once on the conditioning of `obs`, returning its ms
    (CUDA-synchronised)."""
    pol, dev = runner.policy, runner.device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in runner.prepare(obs).items()}
    autocast = bf16_autocast(dev)
    with torch.inference_mode(), autocast:
        cond, mask = pol.condition(batch)

    def call() -> float:
        with torch.inference_mode(), autocast:
            gen = torch.Generator(device=dev).manual_seed(0)
            runner.sync()
            t0 = time.perf_counter()
            pol.head.sample(cond, mask, generator=gen)
            runner.sync()
            return (time.perf_counter() - t0) * 1e3

    return call


def _heads_alone(calls: dict[str, Any], iters: int, warmup: int) -> dict[str, list[float]]:
    """Time every head's `call` in alternation (head A, B, C, A, B, C, ...), so that a change of machine load
    hits all heads alike: the ratios are side by side, not one configuration after the other."""
    out: dict[str, list[float]] = {h: [] for h in calls}
    for i in range(warmup + iters):
        for head, call in calls.items():
            ms = call()
            if i >= warmup:
                out[head].append(ms)
    return out


def _time_calls(runner, obs, warmup: int, iters: int, bar) -> tuple[dict[str, list[float]], float, float]:
    """`warmup` untimed calls, then `iters` timed ones: (per-stage timings in ms, wall seconds, CPU seconds)."""
    for _ in range(warmup):
        runner.infer(obs)
        bar.update()
    samples: dict[str, list[float]] = {s: [] for s in STAGES}
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        timing = runner.infer(obs)["timing"]
        for s in STAGES:
            samples[s].append(timing[s])
        bar.update()
    return samples, time.perf_counter() - t0, time.process_time() - c0


def _row(timed, iters: int, config: str, threads: int, head: str, steps, views: int, mode: str, compile: bool):  # noqa: A002
    """One benchmark row: what was measured, loop Hz (wall and CPU time) and p50 / p99 per stage (ms)."""
    samples, wall, cpu = timed
    row = {
        "config": config,
        "threads": threads,
        "head": head,
        "steps": steps,
        "views": views,
        "mode": mode,
        "iters": iters,
        "hz": iters / wall,
        "hz_cpu": iters / max(cpu, 1e-9),
        "compile": compile,
    }
    for s in STAGES:
        row[f"{s[:-3]}_p50"] = float(np.percentile(samples[s], 50))
        row[f"{s[:-3]}_p99"] = float(np.percentile(samples[s], 99))
    return row


def bench_latency(
    vl_model: str | Path,
    *,
    heads=("regression", "diffusion", "flow"),
    views=(1, 3),
    modes=("full", "fast_slow"),
    iters: int = 30,
    warmup: int = 5,
    device: str = "cpu",
    sensor_channels: int = 33,
    image_size: int = 224,
    steps: tuple[int, int] = DEFAULT_STEPS,
    threads: Iterable[int] | None = None,
    config: str = "tiny",
    compile: bool = False,  # noqa: A002 (the flag's name, --runtime.compile)
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per (threads, head, views, mode): p50/p99 per stage (ms), loop Hz, and in the rows of the first
    mode the head alone's p50/p99 (ms), timed for all heads in alternation.

    Args:
        steps: (DDIM steps, flow Euler steps) for the diffusion and flow heads.
        threads: torch intra-op thread counts to measure side by side (None: the current setting only);
            the setting is restored afterwards.
        config: a label for the rows (e.g. "tiny", "vl_dominant").
        compile: `torch.compile` the sensor encoder and head (`--runtime.compile`).
        progress: a tqdm bar over all calls.
    """
    from sensorvla.progress import Progress

    rng = np.random.default_rng(0)
    before = torch.get_num_threads()
    thread_list = list(threads) if threads is not None else [before]
    combos = [(n, h, v, m) for n in thread_list for v in views for m in modes for h in heads]
    calls: dict[tuple, dict[str, Any]] = {}
    bar = Progress(total=len(combos) * (warmup + iters), desc=f"bench latency ({config})", unit="calls", mode=progress)
    rows = []
    try:
        for n, head, v, mode in combos:
            torch.set_num_threads(n)
            bar.set_postfix(threads=n, head=head, views=v, mode=mode)
            runner = _runner(str(vl_model), head, v, mode, device, sensor_channels, image_size, steps, compile)
            obs = _obs(v, sensor_channels, image_size, rng)
            timed = _time_calls(runner, obs, warmup, iters, bar)
            steps_of = {"diffusion": steps[0], "flow": steps[1]}.get(head)
            rows.append(_row(timed, iters, config, n, head, steps_of, v, mode, compile))
            if mode != modes[0]:  # the head alone does not depend on the mode: measured once
                continue
            calls.setdefault((n, v, mode), {})[head] = _head_calls(runner, obs)
            if head == heads[-1]:  # every head of this (threads, views, mode) is built: time them side by side
                alone = _heads_alone(calls.pop((n, v, mode)), iters, min(warmup, 3))
                for r in rows:
                    if (r["threads"], r["views"], r["mode"]) == (n, v, mode) and r["head"] in alone:
                        r["head_alone_p50"] = float(np.percentile(alone[r["head"]], 50))
                        r["head_alone_p99"] = float(np.percentile(alone[r["head"]], 99))
    finally:
        bar.close()
        torch.set_num_threads(before)
    return rows


def bench_checkpoint(
    path: str | Path,
    *,
    modes=("full", "fast_slow"),
    iters: int = 30,
    warmup: int = 5,
    device: str = "cpu",
    threads: Iterable[int] | None = None,
    compile: bool = False,  # noqa: A002 (--runtime.compile)
    progress: bool = False,
) -> list[dict[str, Any]]:
    """A trained `pretrained_model/` folder as it would be served: its own views, sensor channels, head and
    image size (the processor's max pixels); one row per (threads, mode), the rows of `bench_latency`."""
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.progress import Progress

    rng = np.random.default_rng(0)
    before = torch.get_num_threads()
    thread_list = list(threads) if threads is not None else [before]
    bar = Progress(
        total=len(thread_list) * len(modes) * (warmup + iters), desc="bench checkpoint", unit="calls", mode=progress
    )
    rows = []
    try:
        for n in thread_list:
            torch.set_num_threads(n)
            for mode in modes:
                refresh = {"vl_refresh_every": 10_000, "max_vl_age_s": 1e9} if mode == "fast_slow" else {}
                runner = PolicyRunner.from_pretrained(path, device=device, compile_model=compile or None, **refresh)
                cfg = runner.cfg
                side = max(28, int(math.isqrt(int(cfg.model.backbone.max_pixels))))
                obs = _obs(cfg.model.num_views, cfg.model.sensor.channels, side, rng)
                timed = _time_calls(runner, obs, warmup, iters, bar)
                head = cfg.model.head.type
                steps = cfg.model.head.num_inference_steps if head != "regression" else None
                row = _row(timed, iters, "checkpoint", n, head, steps, cfg.model.num_views, mode, compile)
                rows.append({**row, "image_size": side})
    finally:
        bar.close()
        torch.set_num_threads(before)
    return rows


def _p50(rows, key="total_p50", **kw) -> float:
    vals = [r[key] for r in rows if key in r and all(r.get(k) == v for k, v in kw.items())]
    return float(np.mean(vals)) if vals else float("nan")


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Headline ratios of p50 (means over the rows that match) on the first config measured (the tiny model in
    `run_suite`): total diffusion/regression, flow/regression, full/fast-slow, max/min views; head alone
    diffusion/regression and flow/regression."""
    rows = [r for r in rows if r.get("config") == rows[0].get("config")] if rows else rows
    vs = sorted({r["views"] for r in rows})
    reg_full = _p50(rows, head="regression", mode="full")
    return {
        "diffusion_over_regression": _p50(rows, head="diffusion", mode="full") / reg_full,
        "flow_over_regression": _p50(rows, head="flow", mode="full") / reg_full,
        "full_over_fast_slow": _p50(rows, mode="full") / _p50(rows, mode="fast_slow"),
        f"views_{vs[-1]}_over_{vs[0]}": _p50(rows, views=vs[-1], mode="full") / _p50(rows, views=vs[0], mode="full")
        if len(vs) > 1
        else float("nan"),
        "head_alone_diffusion_over_regression": _p50(rows, "head_alone_p50", head="diffusion")
        / _p50(rows, "head_alone_p50", head="regression"),
        "head_alone_flow_over_regression": _p50(rows, "head_alone_p50", head="flow")
        / _p50(rows, "head_alone_p50", head="regression"),
    }


def targets(rows: list[dict[str, Any]], vl_dominant: str = "vl_dominant", tiny: str = "tiny") -> list[dict[str, Any]]:
    """The issue-12 goals measured on `rows`, one entry per (goal, threads, views / head):
    P3 fast-slow / full total on the VL-dominant config (<= 0.1), head alone DDIM / regression (<= 4) and
    flow / regression (<= 2.5) on the tiny model, the tiny model's regression fast-slow loop on 1 thread (>= 500 Hz).
    Goals whose rows were not measured are left out. Each entry: name, value, op, target, met."""
    out = []

    def add(name, value, op, target):
        if np.isfinite(value):
            met = bool(value <= target if op == "<=" else value >= target)
            out.append({"name": name, "value": value, "op": op, "target": target, "met": met})

    for n in sorted({r["threads"] for r in rows}):
        for head in ("regression", "diffusion", "flow"):
            kw = {"config": vl_dominant, "threads": n, "head": head}
            vs = sorted({r["views"] for r in rows if r["config"] == vl_dominant})
            for v in vs[:1]:
                ratio = _p50(rows, mode="fast_slow", views=v, **kw) / _p50(rows, mode="full", views=v, **kw)
                add(f"P3 fast-slow / full, {head}, VL-dominant, {v} view(s), {n} thread(s)", ratio, "<=", 0.1)
        for v in sorted({r["views"] for r in rows if r["config"] == tiny}):
            kw = {"config": tiny, "threads": n, "views": v, "mode": "full"}
            reg = _p50(rows, "head_alone_p50", head="regression", **kw)
            for head, target in (("diffusion", 4.0), ("flow", 2.5)):
                steps = next((r["steps"] for r in rows if r["head"] == head), None)
                label = f"DDIM-{steps}" if head == "diffusion" else f"flow-{steps}"
                ratio = _p50(rows, "head_alone_p50", head=head, **kw) / reg
                add(f"P4 head alone {label} / regression, tiny, {v} view(s), {n} thread(s)", ratio, "<=", target)
    loop = [r for r in rows if r["config"] == tiny and r["threads"] == 1 and r["mode"] == "fast_slow"]
    for r in loop:
        if r["head"] == "regression" and r["views"] == 1:
            add("sensor loop Hz (wall), tiny, regression, 1 view, 1 thread", r["hz"], ">=", 500.0)
            add("sensor loop Hz (CPU time), tiny, regression, 1 view, 1 thread", r["hz_cpu"], ">=", 500.0)
    return out


def p3_by_config(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per config with 1-view rows: fast-slow / full total p50 per head (the threads averaged), e.g.
    {"wide": "regression 0.08, diffusion 0.13, flow 0.14"}."""
    out = {}
    for config in dict.fromkeys(r["config"] for r in rows if r["views"] == 1):
        parts = []
        for head in ("regression", "diffusion", "flow"):
            kw = {"config": config, "head": head, "views": 1}
            ratio = _p50(rows, mode="fast_slow", **kw) / _p50(rows, mode="full", **kw)
            if math.isfinite(ratio):
                parts.append(f"{head} {ratio:.3f}")
        if parts:
            out[config] = ", ".join(parts)
    return out


def format_table(rows: list[dict[str, Any]], with_targets: bool = False) -> str:
    """Markdown table of p50 / p99 per stage and of the head alone (ms), loop Hz, the headline ratios, and
    with `with_targets` the goals (met / missed)."""
    head = (
        "| head | views | mode | steps | threads | config | preprocess | VL | sensor | head | post | total p50 | "
        "total p99 | head alone p50 | Hz | Hz (CPU) |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['views']} | {r['mode']} | {r.get('steps') or '-'} | {r.get('threads', '')} | "
            f"{r.get('config', '')} | {r['preprocess_p50']:.2f} | {r['vl_p50']:.2f} | {r['sensor_p50']:.2f} | "
            f"{r['head_p50']:.2f} | {r['postprocess_p50']:.2f} | {r['total_p50']:.2f} | {r['total_p99']:.2f} | "
            f"{_ms(r.get('head_alone_p50'))} | {r['hz']:.0f} | {r.get('hz_cpu', float('nan')):.0f} |"
        )
    lines.append("")
    lines += [f"- {k}: {v:.2f}x" for k, v in ratios(rows).items() if math.isfinite(v)]
    lines += [f"- P3 fast-slow / full on `{c}`, 1 view: {p3}" for c, p3 in p3_by_config(rows).items()]
    if with_targets:
        lines += ["", "| goal | measured | target | |", "|---|---|---|---|"]
        for t in targets(rows):
            lines.append(
                f"| {t['name']} | {t['value']:.3g} | {t['op']} {t['target']:g} | {'met' if t['met'] else 'MISSED'} |"
            )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    """A table cell: the milliseconds, or '-' when not measured."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def describe_threads() -> str:
    """The torch thread setting of this process, for the benchmark's header."""
    import os

    return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
