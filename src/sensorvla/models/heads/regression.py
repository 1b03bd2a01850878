"""Regression head: learned horizon queries + a Transformer decoder over the condition -> the chunk.

It never takes actions as input (the original fed ground truth and learned delta = 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sensorvla.config import HeadConfig
from sensorvla.models.heads.base import ActionHead, Memory, decode, decoder_memory, masked_mean


class RegressionHead(ActionHead):
    """Learned queries attend to the conditioning and regress the chunk directly (L1 or MSE)."""

    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__(cfg, cond_dim)
        d = cfg.hidden_dim
        self.queries = nn.Parameter(torch.randn(1, cfg.horizon, d) * 0.02)
        self.cond_proj = nn.Linear(cond_dim, d) if cond_dim != d else nn.Identity()
        layer = nn.TransformerDecoderLayer(
            d, cfg.num_heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.num_layers)
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.action_dim))

    def predict(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        """cond (B, N_c, D) -> (B, H, D_a)."""
        q = self.queries.expand(cond.shape[0], -1, -1)
        return self.out(decode(self.decoder, q, self.cond_proj(cond), cond_mask))

    def loss(self, cond, cond_mask, actions, action_mask, generator=None):  # deterministic: no noise
        """Per-sample L1 / MSE loss (B,), masked over the horizon (deterministic: no noise)."""
        pred = self.predict(cond, cond_mask)
        fn = F.l1_loss if self.cfg.loss == "l1" else F.mse_loss
        return masked_mean(fn(pred, actions, reduction="none"), action_mask)

    def memory(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> Memory:
        """cond (B, N_c, D) + mask -> the decoder's cross-attention keys / values."""
        return decoder_memory(self.decoder, self.cond_proj(cond), cond_mask)

    def sample_memory(self, memory: Memory, generator=None, num_steps=None, noise=None) -> torch.Tensor:
        """The regressed chunk (B, H, D_a) from a `memory`; `generator`, `num_steps` and `noise` are unused."""
        return self.out(decode(self.decoder, self.queries.expand(memory.mask.shape[0], -1, -1), memory))
