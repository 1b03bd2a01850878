"""Runner latency per stage (p50/p99): heads x full/fast-slow x number of views, on untrained policies.

Timings come from `PolicyRunner.infer` (CUDA-synchronised per stage on a GPU). Absolute numbers depend on
the machine; compare the ratios, which are measured side by side in one process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

STAGES = ("preprocess_ms", "vl_ms", "sensor_ms", "head_ms", "postprocess_ms", "total_ms")


def _runner(vl_model: str, head: str, views: int, mode: str, device: str, sensor_channels: int, image_size: int):
    from sensorvla.config import SensorVLAConfig
    from sensorvla.data.normalize import Normalizer, NormStats
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.models.backbone import load_processor
    from sensorvla.models.pretrained import build_policy

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_model)
    cfg.model.backbone.min_pixels = cfg.model.backbone.max_pixels = image_size * image_size
    cfg.model.head.type = head
    cfg.model.head.horizon, cfg.model.head.action_dim = 8, 7
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
) -> list[dict[str, Any]]:
    """One row per (head, views, mode) with p50/p99 per stage in ms."""
    rng = np.random.default_rng(0)
    rows = []
    for head in heads:
        for v in views:
            for mode in modes:
                runner = _runner(str(vl_model), head, v, mode, device, sensor_channels, image_size)
                obs = _obs(v, sensor_channels, image_size, rng)
                for _ in range(warmup):
                    runner.infer(obs)
                samples = {s: [] for s in STAGES}
                t0 = time.perf_counter()
                for _ in range(iters):
                    timing = runner.infer(obs)["timing"]
                    for s in STAGES:
                        samples[s].append(timing[s])
                wall = time.perf_counter() - t0
                row = {"head": head, "views": v, "mode": mode, "iters": iters, "hz": iters / wall}
                for s in STAGES:
                    row[f"{s[:-3]}_p50"] = float(np.percentile(samples[s], 50))
                    row[f"{s[:-3]}_p99"] = float(np.percentile(samples[s], 99))
                rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Headline ratios of total p50: diffusion/regression, flow/regression, full/fast-slow, max/min views."""

    def p50(**kw):
        vals = [r["total_p50"] for r in rows if all(r[k] == v for k, v in kw.items())]
        return float(np.mean(vals)) if vals else float("nan")

    vs = sorted({r["views"] for r in rows})
    return {
        "diffusion_over_regression": p50(head="diffusion", mode="full") / p50(head="regression", mode="full"),
        "flow_over_regression": p50(head="flow", mode="full") / p50(head="regression", mode="full"),
        "full_over_fast_slow": p50(mode="full") / p50(mode="fast_slow"),
        f"views_{vs[-1]}_over_{vs[0]}": p50(views=vs[-1], mode="full") / p50(views=vs[0], mode="full"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of p50 / p99 per stage (ms) plus the headline ratios."""
    head = "| head | views | mode | preprocess | VL | sensor | head | post | total p50 | total p99 |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['views']} | {r['mode']} | {r['preprocess_p50']:.2f} | {r['vl_p50']:.2f} | "
            f"{r['sensor_p50']:.2f} | {r['head_p50']:.2f} | {r['postprocess_p50']:.2f} | "
            f"{r['total_p50']:.2f} | {r['total_p99']:.2f} |"
        )
    lines.append("")
    lines += [f"- {k}: {v:.2f}x" for k, v in ratios(rows).items()]
    return "\n".join(lines)
