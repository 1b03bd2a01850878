"""`profile1d`: a 1-D profile per grid point (an OCT A-scan depth profile, a spectrum) (L,) -> (D,): a strided
Conv1d stack along the profile with GroupNorm, then the mean (overall level) and max (where a peak is)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sensorvla.config import SensorConfig

UNFOLD_MAX_ROWS = 64  # inference batches up to this many profiles (B * T_s) use `conv1d_unfold`


def conv1d_unfold(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """`conv(x)` for (N, C_in, L) as one matmul over unfolded windows -> (N, C_out, L_out).

    Same function as the Conv1d (equal to float rounding; tests/models/test_sensor_fast.py); on CPU it is
    cheaper than the oneDNN kernel for the few short profiles of an inference call, slower for training
    batches, so only small no-grad calls use it.
    """
    (k,), (stride,), (pad,) = conv.kernel_size, conv.stride, conv.padding
    windows = F.pad(x, (pad, pad)).unfold(2, k, stride)  # (N, C_in, L_out, k)
    n, c, length, _ = windows.shape
    cols = windows.permute(0, 2, 1, 3).reshape(n * length, c * k)
    out = F.linear(cols, conv.weight.view(conv.out_channels, -1), conv.bias)  # the bias added inside the matmul
    return out.view(n, length, -1).transpose(1, 2)


class Profile1d(nn.Module):
    """(N, L) profiles -> (N, dim): three strided Conv1d layers (one below L = 16) with GroupNorm and GELU."""

    def __init__(self, shape: tuple[int, ...], dim: int, cfg: SensorConfig):
        super().__init__()
        if len(shape) != 1:
            raise ValueError(f"a profile1d stream is a 1-D profile (L,) per sample, got {tuple(shape)}")
        channels, layers, c_in = cfg.ascan_conv_channels, [], 1
        for _ in range(3 if shape[0] >= 16 else 1):
            layers += [
                nn.Conv1d(c_in, channels, kernel_size=5, stride=2, padding=2),
                nn.GroupNorm(min(4, channels), channels),
                nn.GELU(),
            ]
            c_in = channels
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(channels * 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L) profiles -> (N, dim). With gradients it runs eagerly under `torch.compile` (inductor's CPU backward
        of this conv stack gave NaN conv gradients, torch 2.13, tests/models/test_heads_compile.py); inference graphs
        (`torch.export`, inference/tick.py) include it."""
        if torch.is_grad_enabled():
            return self._eager(x)
        return self.features(x)

    @torch.compiler.disable
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The conv stack and pooling of `forward`, (N, L) -> (N, dim)."""
        h = x.unsqueeze(1)
        small = not torch.is_grad_enabled() and h.shape[0] <= UNFOLD_MAX_ROWS
        for layer in self.conv:  # (N, ch, L')
            h = conv1d_unfold(h, layer) if small and isinstance(layer, nn.Conv1d) else layer(h)
        return self.proj(torch.cat([h.mean(-1), h.amax(-1)], dim=-1))
