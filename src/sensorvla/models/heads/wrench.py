"""The wrench output: the force channels over the action horizon (B, H, C_f), from the conditioning the action head
sees (hybrid force-position; ForceVLA2 and Tactile-VLA predict force too). Trained as an auxiliary loss
(`--model.wrench-output.weight`), served beside the actions.

Two seams keep it apart from where the target comes from: `wrench_target(batch)` is the only reader of the target
in a model batch (the data layer builds it: `data/dataset.py`), and `WrenchHead` only sees the conditioning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sensorvla.config import WrenchOutputConfig
from sensorvla.models.heads.base import decode, masked_mean

TARGET, TARGET_MASK = "wrench_target", "wrench_target_mask"  # the batch keys (docs/interfaces.md section 3)


def wrench_target(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The wrench target of a model batch: (values (B, H, C_f) normalized, mask (B, H) bool), or None when the batch
    carries none (a dataset without force channels, an observation at serving time)."""
    if TARGET not in batch:
        return None
    return batch[TARGET].float(), batch[TARGET_MASK].bool()


class WrenchHead(nn.Module):
    """H learned queries cross-attend to the conditioning (one pre-norm decoder layer) -> (B, H, C_f).

    Args:
        cfg: the wrench output's config (width, heads).
        cond_dim: D, the conditioning's width.
        horizon: H, the action chunk's length.
        channels: C_f, the force channels predicted.
    """

    def __init__(self, cfg: WrenchOutputConfig, cond_dim: int, horizon: int, channels: int):
        super().__init__()
        if horizon <= 0 or channels <= 0:
            raise ValueError("the wrench head needs a resolved horizon and force channels (> 0)")
        d = cfg.hidden_dim
        self.channels = channels
        self.queries = nn.Parameter(torch.randn(1, horizon, d) * 0.02)
        self.cond_proj = nn.Linear(cond_dim, d) if cond_dim != d else nn.Identity()
        layer = nn.TransformerDecoderLayer(
            d, cfg.num_heads, 4 * d, 0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, 1)
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, channels))

    def forward(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        """cond (B, N_c, D), cond_mask (B, N_c) -> the wrench (B, H, C_f), normalized."""
        q = self.queries.expand(cond.shape[0], -1, -1)
        return self.out(decode(self.decoder, q, self.cond_proj(cond), cond_mask))

    def loss(
        self, cond: torch.Tensor, cond_mask: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample L1 (B,) over the measured steps of `target` (B, H, C_f) (`mask` (B, H)); 0 for a sample
        with none."""
        return masked_mean(F.l1_loss(self(cond, cond_mask), target, reduction="none"), mask)


def build_wrench_head(cfg: WrenchOutputConfig, cond_dim: int, horizon: int, channels: int) -> WrenchHead | None:
    """The wrench head when `--model.wrench-output.enabled`, else None."""
    return WrenchHead(cfg, cond_dim, horizon, channels) if cfg.enabled else None
