"""The `sensorvla` subcommands other than `train`: each parses typed arguments (tyro) and calls one function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from sensorvla.config import DataConfig


def data_synth(
    out: Path,
    episodes: int = 24,
    seed: int = 0,
    sensor_channels: int = 33,
    sensor_rate: float = 650.0,
    image_size: int = 112,
    task: Literal["align_insert", "contact"] = "align_insert",
    image_format: Literal["video", "npy"] = "video",
) -> int:
    """Generate the synthetic insertion dataset (the demo's data, the tests' fixture) as LeRobot v3."""
    from sensorvla.data.synth import generate_dataset

    path = generate_dataset(
        out,
        num_episodes=episodes,
        seed=seed,
        sensor_channels=sensor_channels,
        sensor_rate=sensor_rate,
        image_size=image_size,
        task=task,
        image_format=image_format,
    )
    print(f"wrote {path}")
    return 0


def data_import_recorder(
    src: Path,
    out: Path,
    instruction: str | None = None,
    image_size: int | None = None,
    min_actions: int = 8,
    views: tuple[str, ...] | None = None,
    include_joints: bool = False,
    overwrite: bool = False,
    image_format: Literal["video", "npy"] = "video",
) -> int:
    """Convert the original recorder's episode folders (metadata.json, images/, robot_states.csv, sensor_data.npz).

    --image-format video writes LeRobot video features (mp4); npy keeps lossless raw frames (not LeRobot-visible).
    """
    from sensorvla.data.importers.recorder import import_recorder

    path = import_recorder(
        src,
        out,
        instruction=instruction,
        image_size=image_size,
        min_actions=min_actions,
        views=list(views) if views else None,
        include_joints=include_joints,
        overwrite=overwrite,
        image_format=image_format,
    )
    print(f"wrote {path}")
    return 0


def data_import_hdf5(
    src: Path,
    out: Path,
    instruction: str | None = None,
    image_size: int | None = None,
    min_actions: int = 8,
    views: tuple[str, ...] | None = None,
    overwrite: bool = False,
    image_format: Literal["video", "npy"] = "video",
) -> int:
    """Convert plain HDF5 episodes (docs/hdf5-format.md); --image-format as for import-recorder."""
    from sensorvla.data.importers.hdf5 import import_hdf5

    path = import_hdf5(
        src,
        out,
        instruction=instruction,
        image_size=image_size,
        min_actions=min_actions,
        views=list(views) if views else None,
        overwrite=overwrite,
        image_format=image_format,
    )
    print(f"wrote {path}")
    return 0


def data_add_sensor(
    dataset: Path,
    src: Path,
    clock_offset: float = 0.0,
    name: str = "sensor",
    rate: float | None = None,
    force_channels: int | None = None,
    episode: int | None = None,
    overwrite: bool = False,
) -> int:
    """Attach a sensor stream (CSV/NPZ/HDF5: episode_index, timestamps, values) to a LeRobot v3 dataset, in place.

    --clock-offset S is added to the sensor's timestamps to reach the dataset's clock (frame i of an episode is at
    frame_index / fps). See docs/data-format.md, "Add a sensor to a LeRobot dataset".
    """
    from sensorvla.data.attach import add_sensor

    spec = add_sensor(
        dataset,
        src,
        clock_offset=clock_offset,
        name=name,
        rate=rate,
        force_channels=force_channels,
        episode=episode,
        overwrite=overwrite,
    )
    print(f"attached {name!r} to {dataset}: {json.dumps(spec)}")
    return 0


def stats(dataset: Path, data: DataConfig = DataConfig()) -> int:  # noqa: B008  (tyro reads the default)
    """Compute normalization stats on the training split into <dataset>/meta/norm_stats.json.

    Takes the same --data.* flags as `sensorvla train` (split, sensor keys, sensor transforms), which the
    stats record and training checks.
    """
    import dataclasses

    from sensorvla.data.normalize import compute_stats
    from sensorvla.training.data_setup import stats_path

    s = compute_stats(dataset, data_cfg=dataclasses.replace(data, dataset_dir=str(dataset)))
    s.save(stats_path(dataset))
    fp = {k: v for k, v in s.fingerprint.items() if k != "split"}
    split = s.fingerprint["split"]
    print(f"wrote {stats_path(dataset)} ({split['name']} split: {len(split['episodes'])} episodes; {fp})")
    return 0


def tiny_model(out: Path, family: Literal["qwen2_5_vl", "qwen2_vl", "qwen3_vl"] = "qwen2_5_vl", seed: int = 0) -> int:
    """Build a tiny random Qwen-VL (model + tokenizer + processor) in the hub layout, offline."""
    from sensorvla.models.tiny_qwen import build_tiny_qwen_vl

    print(f"wrote {build_tiny_qwen_vl(out, family=family, seed=seed)}")
    return 0


def serve(
    checkpoint: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str = "cpu",
    vl_refresh_every: int = 1,
    max_message_mb: float = 32.0,
    vl_model: str | None = None,
    max_queue: int = 8,
    max_instruction_tokens: int = 256,
    max_image_pixels: int = 2048 * 2048,
    max_sensor_samples: int = 16384,
    sensor_max_gap_s: float | None = None,
) -> int:
    """Serve a pretrained_model folder over websocket + msgpack (openpi-style); /healthz over HTTP.

    Args:
        vl_model: backbone folder or hub id overriding the path recorded in the checkpoint (a checkpoint
            copied to another machine).
        max_queue: requests waiting or running at once; more are answered Busy at once.
        max_instruction_tokens: longest instruction accepted (tokens; characters are bounded first).
        max_image_pixels: largest raw view (h * w) accepted; the processor resizes to max_pixels anyway.
        max_sensor_samples: most sensor rows per request (the server keeps the history).
        sensor_max_gap_s: sensor gap tolerance (default: the rule used in training).
    """
    from sensorvla.inference.checks import RequestLimits
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.serving.server import PolicyServer

    limits = RequestLimits(
        max_instruction_tokens=max_instruction_tokens,
        max_image_pixels=max_image_pixels,
        max_sensor_samples=max_sensor_samples,
    )
    runner = PolicyRunner.from_pretrained(
        checkpoint,
        device=device,
        vl_refresh_every=vl_refresh_every,
        vl_model=vl_model,
        limits=limits,
        max_gap_s=sensor_max_gap_s,
    )
    server = PolicyServer(
        runner, host=host, port=port, token=token, max_message_bytes=int(max_message_mb * 2**20), max_queue=max_queue
    )
    server.run_forever()
    return 0


def evaluate(
    checkpoint: Path,
    dataset: Path,
    split: Literal["train", "val", "test", "all"] = "test",
    out: Path = Path("eval_out"),
    batch_size: int = 16,
    max_samples: int | None = None,
) -> int:
    """Offline metrics on held-out episodes, sensor ablation, plots and a report page."""
    from sensorvla.eval.offline import evaluate as run

    metrics = run(checkpoint, dataset, split=split, out_dir=out, batch_size=batch_size, max_samples=max_samples)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=2))
    print(f"report: {out / 'report.md'}")
    return 0


def rollout(
    checkpoint: Path,
    env: str = "sensorvla/Insertion-v0",
    episodes: int = 10,
    execute_steps: int = 4,
    ablate: bool = True,
    out: Path = Path("rollout_out"),
    seed: int = 0,
) -> int:
    """Closed-loop rollouts of a checkpoint in a Gymnasium environment (chunked execution). With `--ablate`
    (the default) it also runs the sensor-ablated and the vision-ablated (blanked and shuffled views) rows
    and prints one table: all / sensor ablated / vision ablated."""
    import gymnasium as gym

    from sensorvla.eval.envs import register_envs
    from sensorvla.eval.rollout import rollout as run
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.io import atomic_write_json

    register_envs()
    runner = PolicyRunner.from_pretrained(checkpoint)
    rows = {"all": {"video_dir": out}}
    if ablate:
        rows.update(
            sensor_ablated={"ablate_sensor": True},
            vision_ablated={"ablate_vision": "blank"},
            vision_shuffled={"ablate_vision": "shuffled"},
        )
    result = {
        name: run(runner, gym.make(env), episodes=episodes, execute_steps=execute_steps, seed=seed, **kw)
        for name, kw in rows.items()
    }
    atomic_write_json(out / "rollout.json", json.loads(json.dumps(result, default=float)))
    print(rollout_table(result))
    return 0


def rollout_table(result: dict) -> str:
    """Rows of `rollout` results -> a markdown table (success, lateral within tolerance, mean errors)."""

    def fmt(v, pct=False):
        return "–" if v is None else (f"{100 * v:.0f} %" if pct else f"{v:.2f}")

    lines = [
        "| inputs | success | lateral within tolerance | lateral error (mm) | depth error (mm) |",
        "|---|---|---|---|---|",
    ]
    for name, r in result.items():
        lines.append(
            f"| {name.replace('_', ' ')} | {fmt(r['success_rate'], True)} | {fmt(r.get('lateral_ok_rate'), True)} | "
            f"{fmt(r.get('mean_final_lateral_error_mm'))} | {fmt(r.get('mean_final_depth_error_mm'))} |"
        )
    return "\n".join(lines)


def bench_latency(
    vl_model: Path | None = None,
    iters: int = 30,
    steps: tuple[int, int] = (10, 5),
    threads: tuple[int, ...] = (),
    vl_dominant: bool = True,
    compile: bool = False,  # noqa: A002 (--runtime.compile)
) -> int:
    """Runner latency per stage (p50/p99), the head alone (--steps: DDIM steps, flow steps) and the fast-slow
    loop rate: every head x full/fast-slow x 1/3 views on the tiny model (or --vl-model), plus the VL-dominant
    config; --threads 1 2 measures thread counts side by side; prints the goals met / missed."""
    from sensorvla.eval.latency import describe_threads, format_table, run_suite

    print(describe_threads())
    rows = run_suite(
        vl_model, iters=iters, steps=steps, threads=threads or None, vl_dominant=vl_dominant, compile=compile
    )
    print(format_table(rows, with_targets=True))
    return 0


PLAN_HELP = """usage: sensorvla plan [TRAIN FLAGS] [--device cuda|cpu] [--gpus 1,2,4,8] [--views N]
                      [--image-size HxW] [--action-dim N] [--sensor-channels N] [--samples N]
                      [--optimizer-impl auto|for-loop|foreach|fused] [--json PATH] [--measure-steps N]

Memory needed to train a config, computed on the meta device (no weights are loaded): parameters and trainable
parameters per group, weights / gradients / AdamW states by dtype, activations per micro-batch with and without
activation checkpointing, the VL cache on disk, and the peak per GPU for DDP and FSDP2. Every `sensorvla train`
flag applies (seed spellings and dotted overrides), e.g. --vl-model random:Qwen/Qwen2.5-VL-3B-Instruct
--training-stage stage2 --batch-size 4 --grad-accum 8. Shapes come from --data.dataset-dir when given,
otherwise from --views / --image-size / --action-dim / --sensor-channels / --samples.
--measure-steps N also runs N real training steps on this machine (needs --data.dataset-dir) and prints the
measured peak beside the planned one (torch.cuda.max_memory_allocated on CUDA, the allocator's count on CPU).
See docs/scaling.md."""


def plan(argv: list[str]) -> int:
    """`sensorvla plan`: the train flags plus the planner's own (PLAN_HELP); prints the plan."""
    import argparse
    import sys

    from sensorvla.cli import parse_train_config
    from sensorvla.config import ConfigError
    from sensorvla.plan.planner import format_plan, human, write_json
    from sensorvla.plan.planner import plan as make_plan

    ap = argparse.ArgumentParser(prog="sensorvla plan", add_help=False)
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--views", type=int)
    ap.add_argument("--image-size")
    ap.add_argument("--action-dim", type=int)
    ap.add_argument("--sensor-channels", type=int)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--optimizer-impl", default="auto", choices=["auto", "for-loop", "foreach", "fused"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--measure-steps", type=int, default=0)
    args, rest = ap.parse_known_args(argv)
    if args.help:
        print(PLAN_HELP)
        return 0
    try:
        gpus = tuple(int(x) for x in args.gpus.split(","))
        size = tuple(int(x) for x in args.image_size.lower().split("x")) if args.image_size else None
        if size is not None and len(size) != 2:
            raise ValueError
    except ValueError:
        print("error: --gpus takes a comma-separated list (1,2,4) and --image-size HxW (224x224)", file=sys.stderr)
        return 2
    try:
        cfg = parse_train_config(rest)
        _validate_for_plan(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = make_plan(
        cfg,
        device=args.device,
        gpus=gpus,
        views=args.views,
        image_size=size,
        action_dim=args.action_dim,
        sensor_channels=args.sensor_channels,
        samples=args.samples,
        optimizer_impl=args.optimizer_impl,
    )
    print(format_plan(p))
    if args.json:
        write_json(p, args.json)
        print(f"wrote {args.json}")
    if args.measure_steps:
        from sensorvla.plan.measure import measure_step_peak

        if not cfg.data.dataset_dir:
            print("error: --measure-steps needs --data.dataset-dir", file=sys.stderr)
            return 2
        cfg.train.max_steps = max(2, args.measure_steps)
        planned = p.scenarios[0].per_gpu["ddp"][1]
        measured = measure_step_peak(cfg, args.device)
        print(
            f"measured step peak on {args.device}: {human(measured)} (planned {human(planned)}, "
            f"{planned / measured - 1:+.1%})"
        )
    return 0


def _validate_for_plan(cfg) -> None:
    """The trainer's validation, except what only matters for a real run (stage-1 checkpoint present, strategies
    the trainer does not run yet): planning those is the point."""
    import dataclasses

    from sensorvla.config import ConfigError

    check = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage1_checkpoint="(plan)", strategy="ddp"))
    try:
        check.validate()
    except ConfigError as e:
        raise ConfigError(str(e)) from e


def demo(
    out: Path = Path("demo_out"),
    head: Literal["regression", "diffusion", "flow"] = "regression",
    quick: bool = False,
    episodes: int | None = None,
    rollouts: int | None = None,
    baseline: bool | None = None,
) -> int:
    """The full two-stage demo: tiny model + synthetic data -> cache -> stage 1 -> stage 2 -> eval -> closed-loop
    table (all / sensor ablated / vision ablated) beside a plain CNN reference. `--quick` is the < 2 min variant.
    The table and whether each target was met are printed and written to OUT/report.md."""
    import dataclasses

    from sensorvla.demo import DemoSettings, run_demo

    s = DemoSettings.quick() if quick else DemoSettings()
    overrides = {"episodes": episodes, "rollouts": rollouts, "baseline": baseline}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    run_demo(out, head=head, quick=quick, settings=s)
    return 0


COMMANDS = {
    "demo": (demo, "full two-stage demo on the synthetic dataset and the tiny model"),
    "data synth": (data_synth, "generate the synthetic insertion dataset"),
    "data import-recorder": (data_import_recorder, "import the original recorder's episode folders"),
    "data import-hdf5": (data_import_hdf5, "import plain HDF5 episodes"),
    "data add-sensor": (data_add_sensor, "attach a sensor stream to a LeRobot v3 dataset (in place)"),
    "stats": (stats, "compute normalization statistics for a dataset"),
    "tiny-model": (tiny_model, "build a tiny offline Qwen-VL"),
    "serve": (serve, "serve a checkpoint over websocket"),
    "eval": (evaluate, "offline evaluation with sensor ablation and plots"),
    "rollout": (rollout, "closed-loop rollouts in a Gymnasium env"),
    "bench latency": (bench_latency, "runner latency benchmark"),
    "plan": (plan, "memory planner: parameters, state, activations and per-GPU peaks of a train config"),
}
RAW_ARGV_COMMANDS = {"plan"}  # take the train flags; cli.main hands them the raw argv
