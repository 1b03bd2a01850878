"""Named optimizer parameter groups with their own learning rates, asserted to partition the trainable set.

Groups (by parameter-name prefix): head, fusion, sensor_encoder, vl_projection (a learned VL resampler),
vl_lora (language-model LoRA adapters, --vl-lr), vision (the vision tower's LoRA adapters or, with
--model.finetune.full-vision / `full`, its weights: --vision-lr) and language (full fine-tuning, --vl-lr).
Biases, norm weights (1-D tensors) and learned embeddings that are not projections (positions `pos` /
`time_pos` / `pos_embed`, learned `queries`, `missing_tokens`, the fusion `type_emb`, the backbone's
`view_emb`) go to a
`<group>/no_decay` twin with weight decay 0: decay would pull them towards zero for no regularising gain.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

from sensorvla.config import TrainConfig
from sensorvla.models.finetune import HF_BASE_PREFIX, is_lora_param, is_vision_param

# a name component (between dots) that is a learned position / query / missing-token / type embedding
# (`pos`, `time_pos`, `pos_embed`; not `pos_proj`, a projection of fixed Fourier features)
NO_DECAY_COMPONENT = re.compile(r"^(\w+_)?pos(_embed?)?$|^queries$|^missing_tokens?$|^(type|view)_emb$")


def is_no_decay(name: str, ndim: int) -> bool:
    """Weight decay 0 for biases, norms, 1-D tensors and learned embeddings (see module docstring)."""
    if ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
        return True
    return any(NO_DECAY_COMPONENT.search(part) for part in name.split("."))


def group_of(name: str) -> str:
    """Map a trainable parameter name of a VLAPolicy to its group."""
    if name.startswith(("head.", "wrench_head.")):  # the wrench output trains with the action head
        return "head"
    if name.startswith("fusion."):
        return "fusion"
    if name.startswith("sensor_encoder."):
        return "sensor_encoder"
    if name.startswith(HF_BASE_PREFIX):
        if is_vision_param(name):
            return "vision"  # LoRA adapters or full weights of the vision tower: --vision-lr
        return "vl_lora" if is_lora_param(name) else "language"
    if name.startswith("backbone."):
        return "vl_projection"
    raise ValueError(f"parameter {name!r} belongs to no declared group; add it to training/param_groups.py")


def group_lrs(cfg: TrainConfig) -> dict[str, float]:
    """Learning rate of each parameter group (head, fusion, projection, sensor, LoRA, vision, language)."""
    return {
        "head": cfg.lr,
        "fusion": cfg.lr,
        "vl_projection": cfg.lr,
        "sensor_encoder": cfg.sensor_lr,
        "vl_lora": cfg.vl_lr,
        "language": cfg.vl_lr,
        "vision": cfg.vision_lr,
    }


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups for every trainable parameter of `model` (an unwrapped VLAPolicy).

    Asserts that each trainable parameter lands in exactly one group and no frozen one does.
    """
    lrs = group_lrs(cfg)
    groups: OrderedDict[str, dict] = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        base = group_of(name)
        no_decay = is_no_decay(name, p.ndim)
        key = f"{base}/no_decay" if no_decay else base
        g = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "param_names": [],
                "lr": lrs[base],
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            },
        )
        g["params"].append(p)
        g["param_names"].append(name)
    check_groups(model, list(groups.values()))
    return list(groups.values())


def check_groups(model: nn.Module, groups: list[dict]) -> None:
    """AssertionError unless the groups partition the trainable parameters (no duplicates, none missing or frozen)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    seen: list[int] = [id(p) for g in groups for p in g["params"]]
    if len(seen) != len(set(seen)):
        raise AssertionError("a parameter appears in more than one optimizer group")
    if set(seen) != trainable:
        raise AssertionError(
            f"optimizer groups do not match the trainable set: {len(set(seen) - trainable)} frozen in optimizer, "
            f"{len(trainable - set(seen))} trainable missing"
        )


def group_table(model: nn.Module, groups: list[dict]) -> str:
    """A printable table: group, tensors, parameters, learning rate, weight decay; plus totals."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [("group", "tensors", "params", "lr", "wd")]
    for g in groups:
        rows.append(
            (
                g["name"],
                str(len(g["params"])),
                f"{sum(p.numel() for p in g['params']):,}",
                f"{g['lr']:.2e}",
                f"{g['weight_decay']:g}",
            )
        )
    rows.append(("trainable", "", f"{trainable:,}", "", ""))
    rows.append(("frozen", "", f"{total - trainable:,}", "", ""))
    rows.append(("total", "", f"{total:,}", "", ""))
    return "\n".join(aligned_table(rows))


def aligned_table(rows: list[tuple]) -> list[str]:
    """Plain-text table lines of `rows` (the first the header, then a rule): first column left-aligned, the rest
    right-aligned."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def optimizer_impl(requested: str, *, sharded: bool) -> str:
    """`--train.optimizer-impl` auto -> fused (one kernel per step; CPU and CUDA) or, for FSDP2's sharded
    DTensors, foreach. Explicit choices are returned as they are."""
    if requested != "auto":
        return requested
    return "foreach" if sharded else "fused"


def build_optimizer(groups: list[dict], cfg: TrainConfig, *, sharded: bool = False):
    """AdamW over the named groups (betas 0.9, 0.95) with the chosen implementation."""
    import torch

    impl = optimizer_impl(cfg.optimizer_impl, sharded=sharded)
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], betas=(0.9, 0.95), **kwargs
    )
