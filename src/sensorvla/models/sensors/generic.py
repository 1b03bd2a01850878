"""`generic`: the fallback for any shape: the flattened sample through a small MLP."""

from __future__ import annotations

import math

import torch
from torch import nn

from sensorvla.config import SensorConfig


class Generic(nn.Module):
    """(N, *shape) -> (N, dim): Linear-GELU-Linear over the flattened sample."""

    def __init__(self, shape: tuple[int, ...], dim: int, cfg: SensorConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(math.prod(shape), dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *shape) -> (N, dim)."""
        return self.mlp(x.flatten(1))
