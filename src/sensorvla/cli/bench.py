"""`sensorvla bench ...`: benchmarks of the installed package (the repository's own are in benchmarks/)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def bench_latency(
    vl_model: Path | None = None,
    iters: int = 30,
    steps: tuple[int, int] = (10, 5),
    threads: tuple[int, ...] = (),
    vl_dominant: bool = True,
    compile: bool = False,  # noqa: A002 (--runtime.compile)
    checkpoint: Path | None = None,
) -> int:
    """Runner latency per stage (p50/p99), the head alone (--steps: DDIM steps, flow steps) and the fast-slow
    loop rate: every head x full/fast-slow x 1/3 views on the tiny model (or --vl-model), plus the VL-dominant
    config; --threads 1 2 measures thread counts side by side; prints the goals met / missed. --checkpoint
    PATH: a trained pretrained_model/ folder instead, full and fast-slow, with its own views and sensor."""
    from sensorvla.eval.latency import bench_checkpoint, describe_threads, format_table
    from sensorvla.world.latency import run_suite

    print(describe_threads())
    if checkpoint is not None:
        rows = bench_checkpoint(checkpoint, iters=iters, threads=threads or None, compile=compile, progress=True)
        print(format_table(rows))
        return 0
    rows = run_suite(
        vl_model, iters=iters, steps=steps, threads=threads or None, vl_dominant=vl_dominant, compile=compile
    )
    print(format_table(rows, with_targets=True))
    return 0


def bench_sim(
    task: str = "peg-in-hole",
    out: Path = Path("bench_out"),
    demos: int = 50,
    episodes: int = 40,
    image_size: int = 64,
    stage1_epochs: int = 20,
    stage2_steps: int = 160,
    cnn: bool = True,
    cnn_cpu_s: float = 0.0,
    vl_model: str = "",
    videos: Literal["none", "first", "success", "failure", "outcomes", "all"] = "none",
    execute_steps: int = 1,
    vl_refresh_every: int = 1,
    reuse: bool = False,
) -> int:
    """A simulated task end to end: the env's scripted expert records DEMOS -> a LeRobot v3 dataset -> the
    small-data two-stage recipe on the tiny Qwen-VL (budget: STAGE1_EPOCHS epochs, STAGE2_STEPS steps) -> closed
    loop over EPISODES seeded episodes: all modalities / sensor ablated / vision ablated, beside a plain CNN with
    and without the sensor trained on the same demos for the same CPU-seconds (--cnn-cpu-s: a fixed budget
    instead). Prints the table with CPU-seconds and wall time per policy and phase; writes OUT/bench.json and
    OUT/report.md.

    Args:
        task: an env id or a short name: insertion (sensorvla/Insertion-v0), peg-in-hole, blind-bottom, needle.
        out: the output folder (dataset, tiny model, runs, bench.json, report.md).
        demos: expert episodes recorded as the training data.
        episodes: seeded closed-loop episodes per row.
        image_size: camera side in px.
        stage1_epochs: our stage-1 budget (epochs over the VL cache).
        stage2_steps: our stage-2 budget (optimizer steps, exactly).
        cnn: train and roll out the CNN reference (with and without the sensor).
        cnn_cpu_s: the CNN's CPU-seconds; 0 = exactly what our cache + stage 1 + stage 2 used.
        vl_model: a backbone folder instead of the tiny patch-7 model built under OUT.
        videos: which episodes of each row get a rollout video (views, sensor trace, actions) under
            OUT/rollout/<row>/: none, first, success, failure, outcomes (first success and failure), all.
        execute_steps: actions executed of each predicted chunk before the policy is queried again, for ours and
            the CNNs alike (1: re-plan every 100 ms control step, so contact is answered at the next step).
        vl_refresh_every: fast-slow: our VL features are recomputed every K queries and reused in between, the
            sensor encoder and head run on the newest sensor window at every query (1: full inference each time).
        reuse: take the dataset, our trained policy and its CPU-seconds from an earlier run in OUT with the same
            task, demos and budget, and run only the CNNs and the closed loop (e.g. other execution settings).
    """
    flags = dict(locals())
    from sensorvla.world.bench import BenchSettings, run_bench

    run_bench(out, BenchSettings(**{k: v for k, v in flags.items() if k != "out"}))
    return 0


def register(app) -> None:
    """Add `bench latency` and `bench sim` to the `sensorvla` app."""
    from tyro.extras import SubcommandApp

    bench = SubcommandApp()
    bench.command(bench_latency, name="latency")
    bench.command(bench_sim, name="sim")
    app.command(bench, name="bench")
