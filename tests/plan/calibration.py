"""Short training configs for checking the memory planner against measured steps: the calibration of
tests/plan/test_calibration.py and `python benchmarks/run.py plan` (which loads this file)."""

from __future__ import annotations

import copy

from sensorvla.plan.measure import measure_step_peak

SCENARIOS = ("none", "cached", "lora", "lora+ckpt", "full")


def calibration_config(vl_model, dataset, out_dir, scenario: str, dtype: str, pooling: str = "view_mean", **train):
    """A short training config for checking the planner: batch 4, accumulation 2, 3 steps (override with `train`).

    `scenario`: none (stage 1, no cache), cached (builds the VL cache first), lora, lora+ckpt (activation
    checkpointing), full. `pooling`: the VL token mode (--model.backbone.pooling).
    """
    from sensorvla.config import SensorVLAConfig
    from sensorvla.training.loop import train as run

    if scenario not in SCENARIOS:
        raise ValueError(f"scenario {scenario!r}: choose one of {SCENARIOS}")
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_model)
    cfg.model.backbone.dtype = dtype
    cfg.model.backbone.pooling = pooling
    cfg.data.dataset_dir = str(dataset)
    cfg.train.output_dir = str(out_dir)
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps, cfg.train.epochs = 4, 2, 3, 1
    cfg.train.tensorboard = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    if scenario in ("lora", "full", "lora+ckpt"):
        cfg.model.finetune.mode = scenario.removesuffix("+ckpt")
        cfg.model.backbone.activation_checkpointing = scenario.endswith("+ckpt")
    elif scenario == "cached":
        build = copy.deepcopy(cfg)
        build.train.mode = "cache"
        run(build, progress=False)
        cfg.train.use_cache = "always"
    else:
        cfg.train.use_cache = "never"
    return cfg


def planned_and_measured(cfg, scenario: str, device: str = "cpu") -> tuple[int, int]:
    """(planned, measured) step peak in bytes for one calibration config on this machine's `device`."""
    from sensorvla.plan.planner import plan

    p = plan(cfg, device=device, gpus=(1,))
    (sc,) = [s for s in p.scenarios if s.name.endswith(" cached") == (scenario == "cached")]
    return sc.per_gpu["ddp"][1], measure_step_peak(cfg, device)
