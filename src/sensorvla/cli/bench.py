"""`sensorvla bench ...`: benchmarks of the installed package (the repository's own are in benchmarks/)."""

from __future__ import annotations

from pathlib import Path


def bench_latency(vl_model: Path | None = None, iters: int = 30) -> int:
    """Runner latency per stage (p50/p99): heads x full/fast-slow x 1/3 views, on the tiny model."""
    import tempfile

    from sensorvla.eval.latency import bench_latency as run
    from sensorvla.eval.latency import format_table
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    if vl_model is None:
        vl_model = build_tiny_qwen_vl(Path(tempfile.mkdtemp()) / "tiny")
    print(format_table(run(vl_model, iters=iters)))
    return 0


def register(app) -> None:
    """Add `bench latency` to the `sensorvla` app."""
    from tyro.extras import SubcommandApp

    bench = SubcommandApp()
    bench.command(bench_latency, name="latency")
    app.command(bench, name="bench")
