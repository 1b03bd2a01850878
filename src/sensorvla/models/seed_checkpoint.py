"""The seed guide's `.pt` model file format: which tensors go under which key, and loading a stage-1 file.

stage 1: `sensor_encoder` + `action_expert` (every non-backbone, non-sensor tensor: fusion + head + VL projection,
keypoints); a stage 1 that trains the backbone (`--model.finetune.full-vision`, `--finetune-vl lora` / `full`) adds
`vl_backbone`: the backbone tensors it trained (the vision tower, LoRA adapters, the full base), which stage 2 loads
too (`load_stage1_into`). A stage 1 with a frozen backbone writes exactly the seed guide's keys, and a file without
`vl_backbone` (older, or a frozen stage 1) loads as before.
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
BACKBONE_KEY = "vl_backbone"  # stage 1 only, and only when it trains the backbone: the trained backbone tensors
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


def trained_backbone(policy, state: dict | None = None) -> dict:
    """The backbone tensors a run trains, policy key names: the HF base tensors it saves (the vision tower with
    --model.finetune.full-vision, the whole base with `full`) and its LoRA adapters. Empty for a frozen backbone."""
    sd = policy.state_dict() if state is None else state
    saved = saved_state_dict(policy, state)
    out = {k: v.detach().cpu() for k, v in saved.items() if k.startswith(finetune.HF_BASE_PREFIX)}
    out.update({k: v.detach().cpu() for k, v in sd.items() if finetune.is_lora_param(k)})
    return out


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


def _canonical(key: str) -> str:
    """A backbone tensor's name without PEFT's `.base_layer.` infix: a Linear's weight is `x.weight` without LoRA
    on it and `x.base_layer.weight` with LoRA, and either run's tensor is the same trained weight."""
    return key.replace(".base_layer.", ".")


def _stage1_fixes(keys) -> list[str]:
    """What a stage 2 must train to keep stage 1's trained backbone tensors `keys`, as the flags that do it."""
    lora = any(finetune.is_lora_param(k) for k in keys)
    base = [k for k in keys if not finetune.is_lora_param(k)]
    fixes = []
    if lora:
        fixes.append("--finetune-vl lora with stage 1's --model.finetune.lora-r and --lora-target-modules")
    if any(not finetune.is_vision_param(k) for k in base):
        fixes.append("--finetune-vl full (stage 1 fine-tuned the whole backbone)")
    elif base:
        fixes.append("--model.finetune.full-vision true (stage 1 trained the vision tower)")
    return fixes


def carry_backbone(policy, carried: dict, path) -> dict:
    """Map a stage-1 file's `vl_backbone` tensors onto `policy` (key -> policy key). Raises
    `CheckpointMismatchError` naming the fix when one has no place, another shape, or would be frozen and then left
    out of what this run saves (a stage-2 `pretrained_model/` and seed file would silently hold the base weights)."""
    if policy.backbone.model is None:
        raise CheckpointMismatchError(
            f"{path} holds a VL backbone trained in stage 1 ({len(carried)} tensors under `{BACKBONE_KEY}`), but this "
            "policy was built without the backbone's weights (VL features from a cache of the base weights). Build "
            "it with the weights: --train.use-cache never"
        )
    own = policy.state_dict()
    by_name = {_canonical(k): k for k in own}
    kept = set(model_state(policy))  # what this run saves: the tensors it trains
    mapped, homeless, frozen, shapes = {}, [], [], []
    for k, v in carried.items():
        target = by_name.get(_canonical(k))
        if target is None:
            homeless.append(k)
        elif target not in kept:
            frozen.append(k)
        elif own[target].shape != v.shape:
            shapes.append(k)
        else:
            mapped[target] = v
    if homeless or frozen or shapes:
        problems = [
            f"{what}: {sorted(keys)[:5]}"
            for what, keys in (
                ("no such tensor in this model", homeless),
                ("frozen and not saved by this run", frozen),
                ("another shape here", shapes),
            )
            if keys
        ]
        raise CheckpointMismatchError(
            f"{path} holds backbone weights trained in stage 1 (`{BACKBONE_KEY}`, {len(carried)} tensors) that this "
            f"stage 2 cannot carry on ({'; '.join(problems)}): starting from the base weights would lose what stage 1 "
            f"trained. Train them in stage 2 as stage 1 did: {' and '.join(_stage1_fixes(homeless + frozen + shapes))}"
        )
    return mapped


def load_stage1_into(policy, path: str | Path) -> dict:
    """Load a stage-1 checkpoint's sensor encoder + action expert into `policy` strictly, and the backbone tensors
    stage 1 trained (`vl_backbone`, when it has them: `carry_backbone`)."""
    ckpt = load_seed_checkpoint(path)
    missing_top = [k for k in STAGE1_KEYS if k not in ckpt]
    if missing_top:
        raise seed_mismatch(path, missing_top, [k for k in ckpt if k not in (*SEED_KEYS["stage1"], BACKBONE_KEY)])
    sensor_exp, expert_exp = split_stage1(policy)
    got = {**ckpt["sensor_encoder"], **ckpt["action_expert"]}
    expected = set(sensor_exp) | set(expert_exp)
    if set(got) != expected:
        raise seed_mismatch(path, expected - set(got), set(got) - expected)
    own = policy.state_dict()
    bad = [k for k in got if own[k].shape != got[k].shape]
    if bad:
        raise CheckpointMismatchError(f"Checkpoint loading mismatch in {path}: shapes differ for {bad[:10]}")
    backbone = carry_backbone(policy, ckpt[BACKBONE_KEY], path) if ckpt.get(BACKBONE_KEY) else {}
    policy.load_state_dict({**got, **backbone}, strict=False)  # key sets verified above; the rest is the frozen base
    loaded = policy.state_dict()
    logger.info(
        "loaded stage-1 weights from %s (%d tensors%s, epoch %s, val_loss %s)",
        path,
        len(got) + len(backbone),
        f", {len(backbone)} of them the backbone's trained in stage 1" if backbone else "",
        ckpt.get("epoch"),
        ckpt.get("val_loss"),
    )
    info = {
        "path": str(path),
        "epoch": ckpt.get("epoch"),
        "val_loss": ckpt.get("val_loss"),
        # what the policy holds now (not what the file holds): proves the load took effect
        "sha256": tensors_sha256({k: loaded[k] for k in got}),
    }
    if backbone:
        info["vl_backbone_sha256"] = tensors_sha256({k: loaded[k] for k in backbone})
    return info
