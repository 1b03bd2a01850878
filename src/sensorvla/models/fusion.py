"""Fusion: VL tokens + sensor tokens + robot state -> the head's conditioning sequence (B, N_c, D).

Strategies, chosen by name (`--fusion-strategy`):
- concat (default): project each to D, add a type embedding, concatenate tokens.
- cross_attention: VL tokens attend to the (several) sensor tokens, then concat with the sensor tokens.
- gated: a per-channel sigmoid gate from pooled VL and pooled sensor scales the sensor tokens, then concat.
With the sensor disabled the sequence is [VL tokens, state token].
"""

from __future__ import annotations

import torch
from torch import nn

from sensorvla.config import FusionConfig


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class Fusion(nn.Module):
    """Base: projections, type embeddings and the final concatenation shared by every strategy."""

    def __init__(self, cfg: FusionConfig, vl_dim: int, sensor_dim: int | None, state_dim: int):
        super().__init__()
        d = cfg.hidden_dim
        self.out_dim = d
        if cfg.vl_projector == "mlp":
            self.vl_proj = nn.Sequential(nn.LayerNorm(vl_dim), nn.Linear(vl_dim, d), nn.GELU(), nn.Linear(d, d))
        else:
            self.vl_proj = nn.Sequential(nn.LayerNorm(vl_dim), nn.Linear(vl_dim, d))
        self.sensor_proj = nn.Linear(sensor_dim, d) if sensor_dim else None
        self.state_proj = nn.Linear(state_dim, d) if state_dim else None
        self.type_emb = nn.Parameter(torch.randn(3, d) * 0.02)  # vl, sensor, state

    def mix(self, vl: torch.Tensor, vl_mask: torch.Tensor, s: torch.Tensor, s_mask: torch.Tensor):
        """Strategy hook: (projected VL, projected sensor) -> (vl tokens, sensor tokens)."""
        return vl, s

    def project_vl(self, vl: torch.Tensor) -> torch.Tensor:
        """VL tokens (B, N_vl, D_vl) -> (B, N_vl, D): the projection + type embedding (per token, no mixing)."""
        return self.vl_proj(vl) + self.type_emb[0]

    def forward(self, vl, vl_mask, sensor_tok=None, sensor_mask=None, state=None, *, vl_projected=None):
        """vl (B, N_vl, D_vl), sensor_tok (B, N_s, D_s) | None, state (B, D_st) | None -> (B, N_c, D), (B, N_c).

        `vl_projected`: `project_vl(vl)` computed earlier (fast-slow inference reuses it while the VL features
        are reused); `vl` is then not read.
        """
        v = self.project_vl(vl) if vl_projected is None else vl_projected
        v, tail, tail_mask = self.parts(v, vl_mask, sensor_tok, sensor_mask, state)
        if tail is None:
            return v, vl_mask.bool()
        return torch.cat([v, tail], dim=1), torch.cat([vl_mask.bool(), tail_mask], dim=1)

    def parts(self, v, vl_mask, sensor_tok=None, sensor_mask=None, state=None):
        """The conditioning in two parts: projected VL tokens v (B, N_vl, D) -> (VL tokens (B, N_vl, D), tail
        (B, N_s [+ 1], D) | None, tail mask | None): the sensor tokens and the state token follow the VL tokens.
        Where `keeps_vl_tokens` the VL tokens come back unchanged, so a caller reusing VL features may reuse
        whatever it derived from them (the head's `Memory` of them, in fast-slow inference)."""
        parts, masks = [], []
        if self.sensor_proj is not None and sensor_tok is not None:
            s = self.sensor_proj(sensor_tok) + self.type_emb[1]
            v, s = self.mix(v, vl_mask.bool(), s, sensor_mask.bool())
            parts.append(s)
            masks.append(sensor_mask.bool())
        if self.state_proj is not None and state is not None:
            parts.append((self.state_proj(state) + self.type_emb[2]).unsqueeze(1))
            masks.append(torch.ones(state.shape[0], 1, dtype=torch.bool, device=state.device))
        if not parts:
            return v, None, None
        return v, torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    keeps_vl_tokens = True  # `mix` returns the VL tokens unchanged (concat, gated); cross_attention changes them


class ConcatFusion(Fusion):
    """Concatenate projected tokens (the seed's default)."""


class CrossAttentionFusion(Fusion):
    """VL tokens query the sensor tokens (multi-token keys, so the sensor really shapes the output)."""

    keeps_vl_tokens = False

    def __init__(self, cfg: FusionConfig, vl_dim: int, sensor_dim: int | None, state_dim: int):
        super().__init__(cfg, vl_dim, sensor_dim, state_dim)
        self.attn = nn.MultiheadAttention(cfg.hidden_dim, cfg.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    def mix(self, vl, vl_mask, s, s_mask):
        """VL tokens (B, N_vl, D) attend to the sensor tokens (B, N_s, D); returns (mixed VL tokens, sensor tokens)."""
        attended, _ = self.attn(vl, s, s, key_padding_mask=~s_mask, need_weights=False)
        return self.norm(vl + attended), s


class GatedFusion(Fusion):
    """A per-channel gate in [0, 1] computed from pooled VL and pooled sensor scales the sensor tokens."""

    def __init__(self, cfg: FusionConfig, vl_dim: int, sensor_dim: int | None, state_dim: int):
        super().__init__(cfg, vl_dim, sensor_dim, state_dim)
        self.gate = nn.Linear(2 * cfg.hidden_dim, cfg.hidden_dim)

    def mix(self, vl, vl_mask, s, s_mask):
        """Gate the sensor tokens (B, N_s, D) by a sigmoid of both modalities' masked means; VL tokens unchanged."""
        g = torch.sigmoid(self.gate(torch.cat([_masked_mean(vl, vl_mask), _masked_mean(s, s_mask)], dim=-1)))
        return vl, s * g.unsqueeze(1)


FUSIONS = {"concat": ConcatFusion, "cross_attention": CrossAttentionFusion, "gated": GatedFusion}


def build_fusion(cfg: FusionConfig, vl_dim: int, sensor_dim: int | None, state_dim: int) -> Fusion:
    """The fusion named by `--fusion-strategy` (concat, cross_attention, gated); ValueError naming the choices."""
    if cfg.strategy not in FUSIONS:
        raise ValueError(f"--fusion-strategy {cfg.strategy!r} is unknown; choose one of {sorted(FUSIONS)}")
    return FUSIONS[cfg.strategy](cfg, vl_dim, sensor_dim, state_dim)
