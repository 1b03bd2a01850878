"""Action heads by registry key: regression, diffusion (DDPM/DDIM), flow (flow matching)."""

from __future__ import annotations

from sensorvla.config import HeadConfig
from sensorvla.models.heads.base import ActionHead


def _registry() -> dict[str, type[ActionHead]]:
    from sensorvla.models.heads.diffusion import DiffusionHead
    from sensorvla.models.heads.flow import FlowHead
    from sensorvla.models.heads.regression import RegressionHead

    return {"regression": RegressionHead, "diffusion": DiffusionHead, "flow": FlowHead}


HEAD_TYPES = ("regression", "diffusion", "flow")


def build_head(cfg: HeadConfig, cond_dim: int) -> ActionHead:
    """Build the head named by `cfg.type` (`--model.head.type`)."""
    heads = _registry()
    if cfg.type not in heads:
        raise ValueError(f"--model.head.type {cfg.type!r} is unknown; choose one of {sorted(heads)}")
    return heads[cfg.type](cfg, cond_dim)
