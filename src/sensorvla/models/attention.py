"""Attention of the policy's small Transformer blocks as functions of their `nn` modules' parameters.

The sensor encoder and the action heads keep `nn.TransformerEncoder` / `nn.TransformerDecoder` (their
parameters, names and checkpoints); their forward runs through these functions: the projections as slices of
`in_proj_weight` and the attention through SDPA, one code path for training and inference. At the sizes of these
blocks (tens of tokens, widths 64-256) a CPU call costs what its ops cost to launch: these functions launch fewer
than `nn.MultiheadAttention`'s forward and its inference fast path, and precomputed keys / values (`Memory`,
models/heads/base.py) are reused across sampling steps and fast-slow ticks.

Shapes: B batch, L query tokens, N key tokens, D width, h heads, d_head = D / h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, heads, L, D / heads)."""
    b, length, d = x.shape
    return x.view(b, length, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d_head) -> (B, L, heads * d_head)."""
    b, heads, length, dh = x.shape
    return x.transpose(1, 2).reshape(b, length, heads * dh)


def dropout_p(attn: nn.MultiheadAttention) -> float:
    """The attention's dropout probability now: its `dropout` in training mode, else 0."""
    return attn.dropout if attn.training else 0.0


def drop(dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`dropout(x)`, without the module call where it is the identity (eval mode or p = 0: most calls)."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


def self_attend(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`attn(x, x, x)` of a batch-first `nn.MultiheadAttention`, x (B, L, D), mask (B, 1, 1, L) bool (True =
    attend) or None -> (B, L, D): one projection for q, k and v."""
    b, length, d = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, length, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, L, d_head)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p(attn))
    return attn.out_proj(merge_heads(a))


def queries(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The query projection (B, h, L, d_head) of x (B, L, D)."""
    d = attn.embed_dim
    return split_heads(F.linear(x, attn.in_proj_weight[:d], attn.in_proj_bias[:d]), attn.num_heads)


def keys_values(attn: nn.MultiheadAttention, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values (B, h, N, d_head) of tokens mem (B, N, D). Projected by slices of `in_proj_weight`
    (slicing the weight, not the projected activation: the packed (2, N, B, D) key/value block is copied and
    zero-filled in every backward, a third of a demo training step on CPU)."""
    d, heads = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    k = F.linear(mem, w[d : 2 * d], b[d : 2 * d])
    return split_heads(k, heads), split_heads(F.linear(mem, w[2 * d :], b[2 * d :]), heads)


def attend(
    attn: nn.MultiheadAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    value_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected q (B, h, L, d_head) over k, v (B, h, N, d_head), mask (B, 1, 1, N) bool or None -> the block's
    output (B, L, D), out projection included. `value_shift` (h, 1, d_head): a term shared by every value (it
    passes through the softmax weights unchanged, so it is added after them)."""
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p(attn))
    if value_shift is not None:
        a = a + value_shift
    return attn.out_proj(merge_heads(a))


def encode(encoder: nn.TransformerEncoder, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`encoder(x, src_key_padding_mask=~mask)` of a pre-norm, batch-first encoder without a final norm: x (B, L, D),
    mask (B, 1, 1, L) bool (True = attend) or None -> (B, L, D)."""
    if encoder.norm is not None or not all(layer.norm_first for layer in encoder.layers):
        raise ValueError("encode() computes pre-norm encoders without a final norm (norm_first=True, norm=None)")
    for layer in encoder.layers:
        x = x + drop(layer.dropout1, self_attend(layer.self_attn, layer.norm1(x), mask))
        x = x + drop(
            layer.dropout2, layer.linear2(drop(layer.dropout, layer.activation(layer.linear1(layer.norm2(x)))))
        )
    return x
