"""The seed guide's four model class names, as thin constructors over the one `VLAPolicy`.

They are not copies: each sets the head and the fine-tuning mode in a config and calls `build_policy`.

| seed name                                | head       | VL backbone                          |
|------------------------------------------|------------|--------------------------------------|
| QwenVLAWithSensor                        | regression | frozen (finetune none)               |
| QwenVLAWithSensorDiffusion               | diffusion  | frozen (finetune none)               |
| Not_freeze_QwenVLAWithSensor             | regression | LoRA (or `finetune_vl`), stage-1 init |
| Not_freeze_QwenVLAWithSensorDiffusion    | diffusion  | LoRA (or `finetune_vl`), stage-1 init |

Each takes what `build_policy` takes: a model config with its dataset-derived fields resolved
(`config.resolve_model`) and the run's `SensorWindow`, or a whole `SensorVLAConfig` (`config.resolve_from_meta`).
"""

from __future__ import annotations

import copy

from sensorvla.data.timeline import SensorWindow
from sensorvla.models.policy import PolicyConfig, build_policy, policy_inputs


def _stage1(cfg: PolicyConfig, head: str, *, sensor_window: SensorWindow | None = None, device="cpu"):
    """A stage-1 seed policy: `head` on a frozen backbone."""
    return _build(cfg, sensor_window, head, "none", None, device)


def _stage2(
    cfg: PolicyConfig,
    head: str,
    *,
    sensor_window: SensorWindow | None = None,
    stage1_checkpoint: str | None = None,
    finetune_vl: str = "lora",
    device="cpu",
):
    """A stage-2 seed policy: `head` with `finetune_vl` on the backbone, from `stage1_checkpoint` when given."""
    return _build(cfg, sensor_window, head, finetune_vl, stage1_checkpoint, device)


def _build(cfg: PolicyConfig, window: SensorWindow | None, head: str, finetune_vl: str, stage1: str | None, device):
    model, window = policy_inputs(cfg, window)
    model = copy.deepcopy(model)
    model.head.type = head
    model.finetune.mode = finetune_vl
    policy = build_policy(model, window, device=device)
    if stage1 is not None:
        from sensorvla.models.seed_checkpoint import load_stage1_into

        load_stage1_into(policy, stage1)
    return policy


def QwenVLAWithSensor(cfg: PolicyConfig, **kw):  # noqa: N802 (seed class name)
    """Stage 1 regression policy: frozen VL; trainable sensor encoder + action expert (keywords: `_stage1`)."""
    return _stage1(cfg, "regression", **kw)


def QwenVLAWithSensorDiffusion(cfg: PolicyConfig, **kw):  # noqa: N802
    """Stage 1 diffusion policy: frozen VL; trainable sensor encoder + diffusion action expert."""
    return _stage1(cfg, "diffusion", **kw)


def Not_freeze_QwenVLAWithSensor(cfg: PolicyConfig, **kw):  # noqa: N802
    """Stage 2 regression policy: LoRA (or `finetune_vl`) on the VL backbone, optionally initialised from a
    stage-1 checkpoint (keywords: `_stage2`)."""
    return _stage2(cfg, "regression", **kw)


def Not_freeze_QwenVLAWithSensorDiffusion(cfg: PolicyConfig, **kw):  # noqa: N802
    """Stage 2 diffusion policy: LoRA on the VL backbone, optionally initialised from a stage-1 checkpoint."""
    return _stage2(cfg, "diffusion", **kw)
