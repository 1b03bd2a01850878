"""`taxel2d`: a tactile array or a small tactile image (H, W) -> (D,): a Conv2d stack over the array, then the
mean (overall pressure) and the max (where the contact is) of its feature maps."""

from __future__ import annotations

import torch
from torch import nn

from sensorvla.config import SensorConfig


class Taxel2d(nn.Module):
    """(N, H, W) -> (N, dim): 3x3 convolutions with GroupNorm (strided while the array is larger than 8)."""

    def __init__(self, shape: tuple[int, ...], dim: int, cfg: SensorConfig):
        super().__init__()
        if len(shape) != 2:
            raise ValueError(f"a taxel2d stream is a 2-D array (H, W) per sample, got {tuple(shape)}")
        ch, size, c_in, layers = cfg.ascan_conv_channels, min(shape), 1, []
        for _ in range(2):
            stride = 2 if size > 8 else 1
            layers += [nn.Conv2d(c_in, ch, 3, stride=stride, padding=1), nn.GroupNorm(min(4, ch), ch), nn.GELU()]
            c_in, size = ch, (size + stride - 1) // stride
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(2 * ch, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W) -> (N, dim)."""
        h = self.conv(x.unsqueeze(1)).flatten(2)
        return self.proj(torch.cat([h.mean(-1), h.amax(-1)], dim=-1))
