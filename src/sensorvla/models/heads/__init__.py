"""Action heads by registry key (`config.HEADS`): regression, diffusion (DDPM/DDIM), flow (flow matching)."""

from __future__ import annotations

import importlib

from sensorvla.config import HEADS, HeadConfig
from sensorvla.models.heads.base import ActionHead


def head_class(name: str) -> type[ActionHead]:
    """The head class registered as `name` in `config.HEADS`."""
    if name not in HEADS:
        raise ValueError(f"--model.head.type {name!r} is unknown; choose one of {sorted(HEADS)}")
    module, cls = HEADS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_head(cfg: HeadConfig, cond_dim: int) -> ActionHead:
    """Build the head named by `cfg.type` (`--model.head.type`)."""
    return head_class(cfg.type)(cfg, cond_dim)
