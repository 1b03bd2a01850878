"""The latency goals' configurations on the embedded tiny backbones (`sensorvla bench latency`, benchmarks/run.py).

`eval/latency.py` measures a given backbone; this builds the tiny model and the VL-dominant one to measure.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sensorvla.eval.latency import BACKBONES, DEFAULT_STEPS, bench_latency
from sensorvla.world.tiny_qwen import build_tiny_qwen_vl


def run_suite(
    vl_model: str | Path | None = None,
    *,
    iters: int = 30,
    steps: tuple[int, int] = DEFAULT_STEPS,
    threads: Iterable[int] | None = None,
    vl_dominant: bool = True,
    device: str = "cpu",
    progress: bool = True,
    compile: bool = False,  # noqa: A002
) -> list[dict[str, Any]]:
    """The goals' configurations side by side: the tiny model (or `vl_model`; every head, 1 and 3 views, full
    and fast-slow) and, with `vl_dominant`, the `BACKBONES` of eval/latency.py (every head, 1 view: the goals'
    VL-dominant config and the wide one, for reference). Tiny backbones are built in a temp dir."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_latency_") as tmp:
        root = Path(tmp)
        tiny = vl_model or build_tiny_qwen_vl(root / "tiny")
        kw = dict(iters=iters, steps=steps, threads=threads, device=device, progress=progress, compile=compile)
        rows = bench_latency(tiny, config="tiny", **kw)
        if vl_dominant:
            for name, arch in BACKBONES.items():
                backbone = build_tiny_qwen_vl(root / name, min_pixels=224 * 224, max_pixels=224 * 224, **arch)
                rows += bench_latency(backbone, config=name, views=(1,), **kw)
        return rows
