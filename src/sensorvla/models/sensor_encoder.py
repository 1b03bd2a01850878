"""`SensorEncoder`: a high-rate sensor window (B, T_s, C_s) -> a few tokens (B, N_s, D).

Force-like scalar channels and the spatial A-scan depth profile take separate paths (a per-step linear
embedding vs. a Conv1d stack *along depth*), are summed per time step, get temporal position embeddings
and a pre-norm Transformer with key-padding masks, then N_s learned queries pool them. Samples without
sensor data get a learned "missing" token sequence instead — never an encoding of zeros. No BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sensorvla.config import SensorConfig
from sensorvla.models.attention import attend, encode, keys_values, queries

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
    out = windows.permute(0, 2, 1, 3).reshape(n * length, c * k) @ conv.weight.view(conv.out_channels, -1).t()
    if conv.bias is not None:
        out = out + conv.bias
    return out.view(n, length, -1).transpose(1, 2)


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
        """A-scan profiles (N, L) -> features (N, out_dim). With gradients it runs eagerly under `torch.compile`
        (inductor's CPU backward of this conv stack gave NaN conv gradients, torch 2.13,
        tests/models/test_heads_compile.py); inference graphs (`torch.export`, inference/tick.py) include it."""
        if torch.is_grad_enabled():
            return self._eager(x)
        return self.features(x)

    @torch.compiler.disable
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The conv stack and pooling of `forward`, (N, L) -> (N, out_dim)."""
        h = x.unsqueeze(1)
        small = not torch.is_grad_enabled() and h.shape[0] <= UNFOLD_MAX_ROWS
        for layer in self.conv:  # (N, ch, L')
            h = conv1d_unfold(h, layer) if small and isinstance(layer, nn.Conv1d) else layer(h)
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
        h = None  # the paths' sum, in the original order (no zero tensor to start from: 0 + x == x)
        if self.force_proj is not None:
            h = self.force_proj(sensor[..., : self.force_channels])
        if self.ascan is not None:
            a = self.ascan(sensor[..., self.force_channels :].reshape(b * t, -1)).reshape(b, t, -1)
            h = a if h is None else h + a
        h = self.in_norm(h + self.time_pos[:, :t])
        valid, present, kpm = self.key_padding(sensor_mask, has_sensor)
        mask = None if kpm is None else ~kpm[:, None, None, :]
        h = encode(self.encoder, h, mask)
        q = self.queries.expand(b, -1, -1)
        tokens = self.out_norm(attend(self.pool, queries(self.pool, q), *keys_values(self.pool, h), mask) + q)
        # samples without data get the learned tokens (training keeps the select, so `missing_tokens` is always in
        # the graph: DDP needs that; without gradients and every sample measured it is a no-op)
        if kpm is not None or torch.is_grad_enabled():
            tokens = torch.where(present[:, None, None], tokens, self.missing_tokens.expand(b, -1, -1))
        return tokens, torch.ones(b, tokens.shape[1], dtype=torch.bool, device=tokens.device)

    @staticmethod
    def key_padding(sensor_mask: torch.Tensor, has_sensor: torch.Tensor):
        """(valid (B, T_s), present (B,), key padding mask (B, T_s) | None): the grid points that carry data, the
        samples with at least one, and the attention's padding mask (None when every point is valid). A sample
        with nothing valid would make attention NaN: it keeps one dummy key, and its tokens are replaced."""
        valid = sensor_mask.bool() & has_sensor.bool()[:, None]
        present = valid.any(dim=1)
        kpm = ~valid
        kpm[:, 0] &= present
        # eager: no mask when all are measured (the common case); a traced graph keeps it (no data-dependent branch)
        static = kpm.device.type == "meta" or torch.compiler.is_compiling()
        if not static and not bool(kpm.any()):
            kpm = None
        return valid, present, kpm
