"""`SensorEncoder`: a high-rate sensor window (B, T_s, C_s) -> a few tokens (B, N_s, D).

Force-like scalar channels and the spatial A-scan depth profile take separate paths (a per-step linear
embedding vs. a Conv1d stack *along depth*), are summed per time step, get temporal position embeddings
and a pre-norm Transformer with key-padding masks, then N_s learned queries pool them. Samples without
sensor data get a learned "missing" token sequence instead — never an encoding of zeros. No BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from sensorvla.config import SensorConfig


class AScanEncoder(nn.Module):
    """(N, C_a) depth profiles -> (N, D): strided Conv1d over depth with GroupNorm, then mean over depth."""

    def __init__(self, depth: int, channels: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, length = 1, depth
        for _ in range(3 if depth >= 16 else 1):
            layers += [
                nn.Conv1d(c_in, channels, kernel_size=5, stride=2, padding=2),
                nn.GroupNorm(min(4, channels), channels),
                nn.GELU(),
            ]
            c_in, length = channels, (length + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(channels * 2, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A-scan profiles (N, L) -> features (N, out_dim)."""
        h = self.conv(x.unsqueeze(1))  # (N, ch, L')
        # mean keeps the overall level, max keeps where a reflection peak is
        return self.proj(torch.cat([h.mean(-1), h.amax(-1)], dim=-1))


class SensorEncoder(nn.Module):
    """Encode a normalized sensor window into N_s tokens.

    Args:
        cfg: sensor config (force_channels, num_tokens, hidden_dim, layers, heads, dropout).
        num_samples: T_s.
        channels: C_s (force channels first, then the A-scan profile).
    """

    def __init__(self, cfg: SensorConfig, num_samples: int, channels: int):
        super().__init__()
        if channels <= 0:
            raise ValueError("SensorEncoder needs channels > 0")
        self.cfg = cfg
        self.num_samples = num_samples
        self.force_channels = min(cfg.force_channels, channels)
        self.ascan_channels = channels - self.force_channels
        d = cfg.hidden_dim
        self.out_dim = d
        self.force_proj = nn.Linear(self.force_channels, d) if self.force_channels else None
        self.ascan = AScanEncoder(self.ascan_channels, cfg.ascan_conv_channels, d) if self.ascan_channels else None
        self.time_pos = nn.Parameter(torch.randn(1, num_samples, d) * 0.02)
        self.in_norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(
            d, cfg.num_heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * 0.02)
        self.pool = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(d)
        self.missing_tokens = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * 0.02)

    def forward(self, sensor: torch.Tensor, sensor_mask: torch.Tensor, has_sensor: torch.Tensor):
        """sensor (B, T_s, C_s), sensor_mask bool (B, T_s), has_sensor bool (B,) -> (B, N_s, D), mask (B, N_s)."""
        b, t, c = sensor.shape
        h = sensor.new_zeros(b, t, self.out_dim)
        if self.force_proj is not None:
            h = h + self.force_proj(sensor[..., : self.force_channels])
        if self.ascan is not None:
            h = h + self.ascan(sensor[..., self.force_channels :].reshape(b * t, -1)).reshape(b, t, -1)
        h = self.in_norm(h + self.time_pos[:, :t])
        valid = sensor_mask.bool() & has_sensor.bool()[:, None]
        present = valid.any(dim=1)  # samples with at least one measured grid point
        # rows with nothing valid would make attention NaN: give them one dummy key, replaced below
        kpm = ~valid
        kpm[~present, 0] = False
        if kpm.device.type != "meta" and not bool(kpm.any()):  # all measured (the common case): no mask
            kpm = None
        h = self.encoder(h, src_key_padding_mask=kpm)
        q = self.queries.expand(b, -1, -1)
        tokens, _ = self.pool(q, h, h, key_padding_mask=kpm, need_weights=False)
        tokens = self.out_norm(tokens + q)
        missing = self.missing_tokens.expand(b, -1, -1)
        tokens = torch.where(present[:, None, None], tokens, missing)
        return tokens, torch.ones(b, tokens.shape[1], dtype=torch.bool, device=tokens.device)
