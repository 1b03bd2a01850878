"""`imu`: a 6-axis IMU sample (accelerometer xyz, gyroscope xyz) -> (D,). Each sensor is embedded on its own and
with its magnitude (|a| carries gravity and impacts whatever the mounting's rotation), then summed."""

from __future__ import annotations

import torch
from torch import nn

from sensorvla.config import SensorConfig


class Imu(nn.Module):
    """(N, 6) -> (N, dim): accel and gyro (3 axes + magnitude each) through their own linear maps, summed."""

    def __init__(self, shape: tuple[int, ...], dim: int, cfg: SensorConfig):
        super().__init__()
        if tuple(shape) != (6,):
            raise ValueError(f"an imu stream is (6,) per sample (accel xyz, gyro xyz), got {tuple(shape)}; use wrench")
        self.accel = nn.Linear(4, dim)
        self.gyro = nn.Linear(4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 6) -> (N, dim)."""
        a, w = x[:, :3], x[:, 3:]
        return self.accel(torch.cat([a, a.norm(dim=1, keepdim=True)], 1)) + self.gyro(
            torch.cat([w, w.norm(dim=1, keepdim=True)], 1)
        )
