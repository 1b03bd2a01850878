"""VL token modes on the VL-dominant config: cache size on disk, cache build time and stage-1 samples/s.

For view_mean, grid (k = 4) and all: build the stage-1 cache, then train a few cached stage-1 steps, on
the wider tiny Qwen2.5-VL with 224 x 224 views (as `bench_train`), all in one run so the figures compare.

Run: `python benchmarks/run.py vl_modes` (see README for the latest figures).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from _scratch import scratch_dir

MODES = ("view_mean", "grid", "all")


def run(steps: int = 20, episodes: int = 4) -> list[dict]:
    from bench_train import _cfg, _setup, _step_times
    from sensorvla.training.loop import train

    root = Path(scratch_dir("bench_vl_modes_"))
    vl, data = _setup(root, episodes)
    rows = []
    for mode in MODES:
        cfg = _cfg(vl, data, root / mode, max_steps=steps, use_cache="always")
        cfg.model.backbone.pooling = mode
        build = copy.deepcopy(cfg)
        build.train.mode = "cache"
        t0 = time.perf_counter()
        folder = Path(train(build, progress=False)["cache_dir"])
        t_build = time.perf_counter() - t0
        train(cfg, progress=False)
        sps = sorted(_step_times(root / mode))
        size = sum(f.stat().st_size for f in folder.glob("*.bin"))
        rows.append(
            {
                "pooling": mode,
                "cache_MB": size / 1e6,
                "cache_build_s": t_build,
                "stage1_samples_per_s": sps[len(sps) // 2],
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| token mode | cache size (MB) | cache build (s) | stage-1 samples/s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['pooling']} | {r['cache_MB']:.2f} | {r['cache_build_s']:.1f} | {r['stage1_samples_per_s']:.0f} |"
        )
    return "\n".join(lines)
