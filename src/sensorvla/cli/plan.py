"""`sensorvla plan`: the memory planner over every `sensorvla train` flag plus the planner's own shape flags."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import tyro

from sensorvla.cli.train import TrainFlags, over_saved_run
from sensorvla.config import ConfigError, SensorVLAConfig

PLAN_HELP = """Memory planner: the per-GPU peak of a train config, without loading weights.

Memory needed to train a config, computed on the meta device (no weights are loaded): parameters and
trainable parameters per group, weights / gradients / AdamW states by dtype, activations per micro-batch with and
without activation checkpointing, the VL cache on disk, and the peak per GPU for DDP and FSDP2. Every
`sensorvla train` flag applies (seed spellings and dotted overrides), e.g. --vl-model
random:Qwen/Qwen2.5-VL-3B-Instruct --training-stage stage2 --batch-size 4 --grad-accum 8. Shapes come from
--data.dataset-dir when given, otherwise from --views / --image-size / --action-dim / --sensor-channels /
--samples. --measure-steps N also runs N real training steps on this machine (needs --data.dataset-dir) and
prints the measured peak beside the planned one (torch.cuda.max_memory_allocated on CUDA, the allocator's count
on CPU). See docs/scaling.md."""


def parse_plan_shape(gpus: str, image_size: str | None) -> tuple[tuple[int, ...], tuple[int, int] | None]:
    """`--gpus 1,2,4` and `--image-size HxW` -> (gpu counts, (h, w) or None); ValueError when malformed."""
    counts = tuple(int(x) for x in gpus.split(","))
    size = tuple(int(x) for x in image_size.lower().split("x")) if image_size else None
    if size is not None and len(size) != 2:
        raise ValueError(image_size)
    return counts, size


def validate_for_plan(cfg: SensorVLAConfig) -> None:
    """The trainer's validation, except what only matters for a real run (stage-1 checkpoint present, strategies
    the trainer does not run yet): planning those is the point."""
    import dataclasses

    check = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage1_checkpoint="(plan)", strategy="ddp"))
    try:
        check.validate()
    except ConfigError as e:
        raise ConfigError(str(e)) from e


def measure(cfg: SensorVLAConfig, device: str, steps: int, planned: int) -> int:
    """Run `steps` real training steps and print their peak memory beside the planned one (bytes)."""
    from sensorvla.plan.measure import measure_step_peak
    from sensorvla.plan.planner import human

    if not cfg.data.dataset_dir:
        print("error: --measure-steps needs --data.dataset-dir", file=sys.stderr)
        return 2
    cfg.train.max_steps = max(2, steps)
    measured = measure_step_peak(cfg, device)
    print(
        f"measured step peak on {device}: {human(measured)} (planned {human(planned)}, {planned / measured - 1:+.1%})"
    )
    return 0


def plan_command(default: SensorVLAConfig, reparse):
    """The `sensorvla plan` subcommand over `default`; `reparse(saved)` re-reads the flags over a saved run."""

    def plan(
        cfg: TrainFlags = default,
        device: Literal["cuda", "cpu"] = "cuda",
        gpus: str = "1,2,4,8",
        views: int | None = None,
        image_size: str | None = None,
        action_dim: int | None = None,
        sensor_channels: int | None = None,
        samples: int | None = None,
        optimizer_impl: Literal["auto", "for-loop", "foreach", "fused"] = "auto",
        json_path: Annotated[Path | None, tyro.conf.arg(name="json")] = None,
        measure_steps: int = 0,
    ) -> int:
        from sensorvla.plan.planner import format_plan, write_json
        from sensorvla.plan.planner import plan as make_plan

        try:
            counts, size = parse_plan_shape(gpus, image_size)
        except ValueError:
            print("error: --gpus takes a comma-separated list (1,2,4) and --image-size HxW (224x224)", file=sys.stderr)
            return 2

        def run(cfg: SensorVLAConfig) -> int:
            try:
                validate_for_plan(cfg)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            shapes = dict(views=views, image_size=size, action_dim=action_dim, sensor_channels=sensor_channels)
            p = make_plan(cfg, device=device, gpus=counts, samples=samples, optimizer_impl=optimizer_impl, **shapes)
            print(format_plan(p))
            if json_path:
                write_json(p, json_path)
                print(f"wrote {json_path}")
            return measure(cfg, device, measure_steps, p.scenarios[0].per_gpu["ddp"][1]) if measure_steps else 0

        return over_saved_run(cfg, reparse, run)

    plan.__doc__ = PLAN_HELP
    return plan
