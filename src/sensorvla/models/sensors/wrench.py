"""`wrench`: force/torque and other low-dimensional vectors (C,) -> (D,), one linear map per grid point."""

from __future__ import annotations

import math

import torch
from torch import nn

from sensorvla.config import SensorConfig


class Wrench(nn.Module):
    """(N, *shape) -> (N, dim): a linear embedding of the flattened sample."""

    def __init__(self, shape: tuple[int, ...], dim: int, cfg: SensorConfig):
        super().__init__()
        self.proj = nn.Linear(math.prod(shape), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *shape) -> (N, dim)."""
        return self.proj(x.flatten(1))
