"""`ActionHead`: the interface every action expert implements, plus shared building blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

from sensorvla.config import HeadConfig


class ActionHead(nn.Module):
    """Predicts an action chunk (B, H, D_a) in normalized units from a conditioning sequence.

    Subclasses implement `loss` (per-sample, masked over padded steps) and `sample`.
    """

    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__()
        if cfg.horizon <= 0 or cfg.action_dim <= 0:
            raise ValueError("head.horizon and head.action_dim must be resolved (> 0) before building a head")
        self.cfg = cfg
        self.horizon, self.action_dim = cfg.horizon, cfg.action_dim

    def loss(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        actions: torch.Tensor,
        action_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """cond (B, N_c, D), cond_mask (B, N_c), actions (B, H, D_a), action_mask (B, H) -> loss (B,).

        `generator` draws the loss's noise / timesteps (validation passes its own); None = the global RNG.
        """
        raise NotImplementedError

    def sample(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """cond (B, N_c, D) -> actions (B, H, D_a)."""
        raise NotImplementedError


def masked_mean(per_elem: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, H, D_a) elementwise loss, (B, H) mask -> (B,) mean over valid steps and dims."""
    m = action_mask.to(per_elem.dtype).unsqueeze(-1)
    return (per_elem * m).sum((1, 2)) / (m.sum((1, 2)) * per_elem.shape[-1]).clamp_min(1.0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (integers or floats) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ChunkDenoiser(nn.Module):
    """Noisy chunk (B, H, D_a) + timestep + cond -> (B, H, D_a): horizon position embeddings, timestep
    MLP added to every step, and a pre-norm Transformer decoder that cross-attends to the condition."""

    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__()
        d = cfg.hidden_dim
        self.in_proj = nn.Linear(cfg.action_dim, d)
        self.pos = nn.Parameter(torch.randn(1, cfg.horizon, d) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.cond_proj = nn.Linear(cond_dim, d) if cond_dim != d else nn.Identity()
        layer = nn.TransformerDecoderLayer(
            d, cfg.num_heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.num_layers)
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.action_dim))
        self.dim = d

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        """Noisy chunk x (B, H, D_a), time t (B,), cond (B, N_c, D) + mask -> output (B, H, D_a)."""
        temb = self.t_mlp(timestep_embedding(t, self.dim)).unsqueeze(1)
        h = self.in_proj(x) + self.pos + temb
        memory = self.cond_proj(cond) + temb
        h = self.decoder(h, memory, memory_key_padding_mask=~cond_mask.bool())
        return self.out(h)
