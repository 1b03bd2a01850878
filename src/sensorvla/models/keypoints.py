"""Keypoint VL tokens: a spatial softmax over each view's token map, as the plain CNN's readout (eval/cnn_baseline.py).

`--model.backbone.keypoints K` (K > 0, token modes `all` and `grid`) replaces each view's image tokens by K
keypoint tokens. Keypoint j of view v scores every token of the view (a linear map of the normalized feature, a
learnt temperature per keypoint), takes the softmax over the view's tokens, and returns

- its expected position: the softmax-weighted mean of the tokens' (row, col) centres, continuous in [0, 1], so a
  keypoint can sit between token centres (sub-token precision, where a token grid alone quantizes position);
- its feature: the softmax-weighted mean of the tokens' features, plus an embedding of j (which keypoint it is).

The output has the layout of the `all` token mode: (B, V * K + 1, D) features, mask and (view, row, col)
positions, the instruction token last. `VLBackbone.project` then adds the 2-D Fourier position of each
keypoint's expected position and the view embedding as for any token, so the head sees "where" and "what".
Only the trainable `project` step changes: `encode` (and the stage-1 VL cache, and serving's slow VL pass) is
that of the token mode, so a cache built for `all` serves the keypoint mode unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class KeypointTokens(nn.Module):
    """Per view: K spatial-softmax keypoints over the view's VL tokens -> K tokens (feature, expected position).

    Args:
        dim: D_vl, the feature width.
        num_views: V.
        keypoints: K per view.
    """

    def __init__(self, dim: int, num_views: int, keypoints: int):
        super().__init__()
        if keypoints <= 0:
            raise ValueError(f"--model.backbone.keypoints must be > 0 here, got {keypoints}")
        self.num_views, self.k = num_views, keypoints
        self.score_norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, keypoints)
        self.log_temperature = nn.Parameter(torch.zeros(keypoints))  # softmax sharpness per keypoint (learnt)
        self.keypoint_emb = nn.Parameter(torch.randn(keypoints, dim) * 0.02)

    def attention(self, feats: torch.Tensor, mask: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """(B, N, D), mask (B, N), views (B, N) -> softmax weights (B, V, K, N); zero rows for a view with no
        valid token (a dropped or missing view)."""
        logits = self.score(self.score_norm(feats.float())) * self.log_temperature.exp()  # (B, N, K)
        out = []
        for v in range(self.num_views):
            valid = (mask & (views == v)).unsqueeze(-1)  # (B, N, 1)
            w = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=1)
            out.append(torch.nan_to_num(w, nan=0.0).transpose(1, 2))  # all -inf -> nan -> 0
        return torch.stack(out, dim=1)

    def forward(
        self, feats: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, views: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-mode output (B, N, D) feats, mask (B, N), pos (B, N, 3) (the instruction token last), views (B, N)
        (V for the instruction) -> keypoint tokens in the same layout: (B, V * K + 1, D), mask, pos."""
        b, _, d = feats.shape
        mask = mask.bool()
        attn = self.attention(feats, mask, views)  # (B, V, K, N)
        xy = torch.einsum("bvkn,bnc->bvkc", attn, pos[..., 1:].float())  # expected (row, col)
        kp_feat = torch.einsum("bvkn,bnd->bvkd", attn, feats.float()) + self.keypoint_emb
        view_idx = torch.arange(self.num_views, device=feats.device, dtype=torch.float32)
        kp_pos = torch.cat([view_idx[None, :, None, None].expand(b, -1, self.k, 1), xy], dim=-1)
        kp_mask = (mask[:, None, :] & (views[:, None, :] == view_idx.long()[None, :, None])).any(-1)  # (B, V)
        is_instr = views == self.num_views
        instr = (feats * is_instr[..., None]).sum(1, keepdim=True)  # the one instruction token (0 when absent)
        instr_ok = (mask & is_instr).any(1, keepdim=True)
        instr_pos = pos.new_tensor([-1.0, 0.0, 0.0]).expand(b, 1, 3)
        out = torch.cat([kp_feat.reshape(b, -1, d).to(feats.dtype), instr], dim=1)
        out_mask = torch.cat([kp_mask.repeat_interleave(self.k, dim=1), instr_ok], dim=1)
        out_pos = torch.cat([kp_pos.reshape(b, -1, 3).to(pos.dtype), instr_pos], dim=1)
        return out, out_mask, out_pos
