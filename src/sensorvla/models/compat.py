"""The seed guide's four model class names, as thin constructors over the one `VLAPolicy`.

They are not copies: each sets the head and the fine-tuning mode in a config and calls `build_policy`.

| seed name                                | head       | VL backbone                          |
|------------------------------------------|------------|--------------------------------------|
| QwenVLAWithSensor                        | regression | frozen (finetune none)               |
| QwenVLAWithSensorDiffusion               | diffusion  | frozen (finetune none)               |
| Not_freeze_QwenVLAWithSensor             | regression | LoRA (or `finetune_vl`), stage-1 init |
| Not_freeze_QwenVLAWithSensorDiffusion    | diffusion  | LoRA (or `finetune_vl`), stage-1 init |

`cfg` must have its dataset-derived fields resolved (`models.pretrained.resolve_from_meta`).
"""

from __future__ import annotations

import copy

from sensorvla.config import SensorVLAConfig
from sensorvla.models.pretrained import build_policy


def _build(cfg: SensorVLAConfig, head: str, finetune_vl: str, stage1_checkpoint: str | None, device):
    cfg = copy.deepcopy(cfg)
    cfg.model.head.type = head
    cfg.model.finetune.mode = finetune_vl
    policy = build_policy(cfg, device=device)
    if stage1_checkpoint is not None:
        from sensorvla.models.seed_checkpoint import load_stage1_into

        load_stage1_into(policy, stage1_checkpoint)
    return policy


def QwenVLAWithSensor(cfg: SensorVLAConfig, *, device="cpu"):  # noqa: N802 (seed class name)
    """Stage 1 regression policy: frozen VL; trainable sensor encoder + action expert."""
    return _build(cfg, "regression", "none", None, device)


def QwenVLAWithSensorDiffusion(cfg: SensorVLAConfig, *, device="cpu"):  # noqa: N802
    """Stage 1 diffusion policy: frozen VL; trainable sensor encoder + diffusion action expert."""
    return _build(cfg, "diffusion", "none", None, device)


def Not_freeze_QwenVLAWithSensor(  # noqa: N802
    cfg: SensorVLAConfig, *, stage1_checkpoint: str | None = None, finetune_vl: str = "lora", device="cpu"
):
    """Stage 2 regression policy: LoRA on the VL backbone, optionally initialised from a stage-1 checkpoint."""
    return _build(cfg, "regression", finetune_vl, stage1_checkpoint, device)


def Not_freeze_QwenVLAWithSensorDiffusion(  # noqa: N802
    cfg: SensorVLAConfig, *, stage1_checkpoint: str | None = None, finetune_vl: str = "lora", device="cpu"
):
    """Stage 2 diffusion policy: LoRA on the VL backbone, optionally initialised from a stage-1 checkpoint."""
    return _build(cfg, "diffusion", finetune_vl, stage1_checkpoint, device)
