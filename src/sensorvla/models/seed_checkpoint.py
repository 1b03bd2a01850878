"""The seed guide's `.pt` model file format: which tensors go under which key, and loading a stage-1 file.

stage 1: `sensor_encoder` + `action_expert` (every non-backbone, non-sensor tensor: fusion + head + VL projection);
stage 2: `model_state_dict` (every tensor except the frozen HF base, LoRA adapters included). Optimizer, scheduler
and resume state around these tensors are the trainer's (`sensorvla.training.checkpoint`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sensorvla import integrity
from sensorvla.io import torch_load
from sensorvla.models import finetune
from sensorvla.models.folder import CheckpointMismatchError, saved_state_dict
from sensorvla.models.sensors.encoder import upgrade_state_dict

logger = logging.getLogger(__name__)

BEST_NAME = "qwen_vla_sensor_best.pt"
STAGE1_KEYS = ("sensor_encoder", "action_expert")
SEED_KEYS = {
    "stage1": (
        "epoch",
        "sensor_encoder",
        "action_expert",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "val_loss",
        "training_stage",
    ),
    "stage2": (
        "epoch",
        "model_state_dict",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "val_loss",
        "training_stage",
    ),
}


def tensors_sha256(sd: dict) -> str:
    """Content hash of a state dict (key order independent); used to prove what a run started from."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def split_stage1(policy, state: dict | None = None) -> tuple[dict, dict]:
    """(sensor_encoder, action_expert) state dicts with policy-level key names."""
    sensor, expert = {}, {}
    for k, v in saved_state_dict(policy, state).items():
        if k.startswith(finetune.HF_BASE_PREFIX):
            continue  # only for `full`, which is not a stage-1 mode
        (sensor if k.startswith("sensor_encoder.") else expert)[k] = v.detach().cpu()
    return sensor, expert


def model_state(policy, state: dict | None = None) -> dict:
    """Stage-2 `model_state_dict`: saved tensors plus LoRA adapters (policy key names)."""
    sd = {k: v.detach().cpu() for k, v in saved_state_dict(policy, state).items()}
    for k, v in (policy.state_dict() if state is None else state).items():
        if finetune.is_lora_param(k):
            sd[k] = v.detach().cpu()
    return sd


def seed_mismatch(path, missing, unexpected) -> CheckpointMismatchError:
    """The seed guide's "Checkpoint loading mismatch" error, naming missing and unexpected keys."""
    return CheckpointMismatchError(
        f"Checkpoint loading mismatch in {path}: missing={sorted(missing)[:20]} unexpected={sorted(unexpected)[:20]}. "
        "Ensure Stage 1 checkpoint contains `sensor_encoder` and `action_expert` keys saved from the same "
        "model config (head, fusion, sensor); check with torch.load(path, weights_only=True).keys()."
    )


def load_seed_checkpoint(path: str | Path) -> dict:
    """Load a seed `.pt` file (tensors only), checking its sha256 sidecar when it has one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} not found; pass the file written by stage 1 (e.g. checkpoints/{BEST_NAME})"
        )
    problems = integrity.verify_sidecar(path)
    if problems:
        raise CheckpointMismatchError("; ".join(problems))
    try:
        payload = torch_load(path)
    except Exception as e:  # weights_only refusal, truncated zip, ...
        raise CheckpointMismatchError(
            f"cannot load {path} with torch.load(weights_only=True): {e}. sensorvla never unpickles "
            "objects; re-save the checkpoint with tensors and plain containers only."
        ) from e
    for key in ("sensor_encoder", "model_state_dict"):  # saved before declared streams: today's key layout
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload[key] = upgrade_state_dict(payload[key])
    return payload


def load_stage1_into(policy, path: str | Path) -> dict:
    """Load a stage-1 checkpoint's sensor encoder + action expert into `policy` strictly."""
    ckpt = load_seed_checkpoint(path)
    missing_top = [k for k in STAGE1_KEYS if k not in ckpt]
    if missing_top:
        raise seed_mismatch(path, missing_top, [k for k in ckpt if k not in SEED_KEYS["stage1"]])
    sensor_exp, expert_exp = split_stage1(policy)
    got = {**ckpt["sensor_encoder"], **ckpt["action_expert"]}
    expected = set(sensor_exp) | set(expert_exp)
    if set(got) != expected:
        raise seed_mismatch(path, expected - set(got), set(got) - expected)
    own = policy.state_dict()
    bad = [k for k in got if own[k].shape != got[k].shape]
    if bad:
        raise CheckpointMismatchError(f"Checkpoint loading mismatch in {path}: shapes differ for {bad[:10]}")
    policy.load_state_dict(got, strict=False)  # exact key set verified above; the rest is the frozen base
    loaded = policy.state_dict()
    logger.info(
        "loaded stage-1 weights from %s (%d tensors, epoch %s, val_loss %s)",
        path,
        len(got),
        ckpt.get("epoch"),
        ckpt.get("val_loss"),
    )
    return {
        "path": str(path),
        "epoch": ckpt.get("epoch"),
        "val_loss": ckpt.get("val_loss"),
        # what the policy holds now (not what the file holds): proves the load took effect
        "sha256": tensors_sha256({k: loaded[k] for k in got}),
    }
