"""Inference kernels for the policy's small Transformer blocks, with their weights packed once.

At the sizes of the sensor encoder and the action heads (tens of tokens, widths of 64-256) a CPU call costs
what its ops cost to launch, not their FLOPs: `F.linear` with a row-major weight is about 2x an `addmm` with
the weight stored transposed, and SDPA's CPU kernel is about 2.5x a bmm-softmax-bmm for 8 queries. These
classes hold each weight transposed and contiguous (the softmax scale folded into the query projection) and
run attention through bmm, as the same functions as the nn modules they are built from
(tests/models/test_packed.py). They are built lazily by `packed()` and rebuilt when a parameter changed
(an optimizer step, `load_state_dict`, a device move); gradients never flow through them (inference only).

Shapes: B batch, L query tokens, N key tokens, D width, h heads, d_head = D / h.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def transposed(w: torch.Tensor) -> torch.Tensor:
    """A weight (out, in) -> its transpose (in, out), contiguous, detached."""
    return w.detach().t().contiguous()


def norm_args(m: nn.LayerNorm) -> tuple:
    """A LayerNorm's `F.layer_norm` arguments after the input."""
    return m.normalized_shape, m.weight.detach(), m.bias.detach() if m.bias is not None else None, m.eps


def linear(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (..., D_in) @ w_t (D_in, D_out) + b -> (..., D_out), one addmm over the flattened leading dims."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b, x2, w_t) if b is not None else x2 @ w_t
    return y.view(*lead, w_t.shape[1])


def key_bias(mask: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """A key mask (B, N) bool (True = attend) -> the additive score bias (B * heads, 1, N), None when all attend."""
    if mask is None or bool(mask.all()):
        return None
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias.repeat_interleave(heads, dim=0).unsqueeze(1)


class PackedAttention:
    """`nn.MultiheadAttention` (batch_first) in eval: queries (B, L, D) attend to keys / values (B, N, D)."""

    def __init__(self, mha: nn.MultiheadAttention):
        if not mha.batch_first or mha._qkv_same_embed_dim is False or mha.in_proj_bias is None:
            raise ValueError("PackedAttention packs batch-first attention with one in_proj_weight and biases")
        d, self.heads = mha.embed_dim, mha.num_heads
        self.d_head = d // self.heads
        scale = self.d_head**-0.5
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        self.q_w, self.q_b = transposed(w[:d] * scale), b[:d] * scale
        self.kv_w, self.kv_b = transposed(w[d:]), b[d:].clone()
        self.qkv_w, self.qkv_b = torch.cat([self.q_w, self.kv_w], dim=1), torch.cat([self.q_b, self.kv_b])
        self.v_w = self.kv_w[:, d:]  # the value projection alone (its timestep term, see ChunkDenoiser)
        self.out_w, self.out_b = transposed(mha.out_proj.weight), mha.out_proj.bias.detach()

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B * h, L, d_head)."""
        b, length, _ = x.shape
        return x.view(b, length, self.heads, self.d_head).transpose(1, 2).reshape(b * self.heads, length, -1)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> scaled queries (B * h, L, d_head)."""
        return self.split(linear(x, self.q_w, self.q_b))

    def keys_values(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mem (B, N, D) -> keys transposed (B * h, d_head, N), values (B * h, N, d_head)."""
        b, n, d = mem.shape
        kv = linear(mem, self.kv_w, self.kv_b).view(b, n, 2, self.heads, self.d_head)
        k_t = kv[:, :, 0].permute(0, 2, 3, 1).reshape(b * self.heads, self.d_head, n)
        v = kv[:, :, 1].transpose(1, 2).reshape(b * self.heads, n, self.d_head)
        return k_t, v

    def attend(self, q, k_t, v, bias=None, batch: int = 1, value_shift: torch.Tensor | None = None) -> torch.Tensor:
        """q (B * h, L, d_head), k_t (B * h, d_head, N), v (B * h, N, d_head), bias (B * h, 1, N) | None ->
        the attention block's output (B, L, D), out projection included. `value_shift` (h, 1, d_head) is added
        to the attended values (a term shared by every value passes through softmax weights unchanged)."""
        scores = torch.bmm(q, k_t) if bias is None else torch.baddbmm(bias, q, k_t)
        a = torch.bmm(torch.softmax(scores, dim=-1), v)
        if value_shift is not None:
            a = a + (value_shift if batch == 1 else value_shift.repeat(batch, 1, 1))
        length = a.shape[1]
        merged = a.view(batch, self.heads, length, self.d_head).transpose(1, 2).reshape(batch * length, -1)
        return torch.addmm(self.out_b, merged, self.out_w).view(batch, length, -1)

    def self_attend(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of x (B, L, D) -> (B, L, D), one projection for q, k and v."""
        b, length, d = x.shape
        qkv = linear(x, self.qkv_w, self.qkv_b).view(b, length, 3, self.heads, self.d_head).permute(2, 0, 3, 1, 4)
        q, k, v = (t.reshape(b * self.heads, length, self.d_head) for t in qkv)  # views when B = 1
        return self.attend(q, k.transpose(1, 2), v, bias, b)


class PackedFeedForward:
    """A Transformer layer's `linear2(activation(linear1(x)))` (eval: no dropout)."""

    def __init__(self, layer: nn.Module):
        self.w1, self.b1 = transposed(layer.linear1.weight), layer.linear1.bias.detach()
        self.w2, self.b2 = transposed(layer.linear2.weight), layer.linear2.bias.detach()
        self.activation: Callable[[torch.Tensor], torch.Tensor] = layer.activation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D)."""
        return linear(self.activation(linear(x, self.w1, self.b1)), self.w2, self.b2)


class PackedEncoderLayer:
    """A pre-norm `nn.TransformerEncoderLayer` in eval: x (B, L, D), key bias (B * h, 1, L) | None -> (B, L, D)."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        if not layer.norm_first:
            raise ValueError("PackedEncoderLayer packs pre-norm layers (norm_first=True)")
        self.attn, self.ff = PackedAttention(layer.self_attn), PackedFeedForward(layer)
        self.norm1, self.norm2 = norm_args(layer.norm1), norm_args(layer.norm2)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """One encoder layer."""
        x = x + self.attn.self_attend(F.layer_norm(x, *self.norm1), bias)
        return x + self.ff(F.layer_norm(x, *self.norm2))


class Memory(NamedTuple):
    """A conditioning sequence as a decoder's cross-attention sees it, computed once and reused: per layer the
    keys (B * h, d_head, N) and values (B * h, N, d_head), and the key mask (B, N) bool (True = attend).

    Keys and values are per token (a linear map of each token), so the memory of a concatenated sequence is
    the concatenation of the parts' memories (`cat`): fast-slow inference keeps the VL tokens' part."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: torch.Tensor

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """The mask as SDPA takes it, (B, 1, 1, N) bool, or None when every token attends."""
        return None if bool(self.mask.all()) else self.mask[:, None, None, :]

    def cat(self, other: Memory) -> Memory:
        """This memory's tokens followed by `other`'s."""
        return Memory(
            tuple(torch.cat([a, b], dim=2) for a, b in zip(self.keys, other.keys, strict=True)),
            tuple(torch.cat([a, b], dim=1) for a, b in zip(self.values, other.values, strict=True)),
            torch.cat([self.mask, other.mask], dim=1),
        )


class PackedDecoder:
    """A pre-norm `nn.TransformerDecoder` without a final norm, in eval, over a precomputed `Memory`."""

    def __init__(self, decoder: nn.TransformerDecoder):
        if decoder.norm is not None or not all(layer.norm_first for layer in decoder.layers):
            raise ValueError("PackedDecoder packs pre-norm decoders without a final norm")
        self.self_attn = [PackedAttention(layer.self_attn) for layer in decoder.layers]
        self.cross_attn = [PackedAttention(layer.multihead_attn) for layer in decoder.layers]
        self.ff = [PackedFeedForward(layer) for layer in decoder.layers]
        self.norms = [
            (norm_args(layer.norm1), norm_args(layer.norm2), norm_args(layer.norm3)) for layer in decoder.layers
        ]
        self.heads = self.cross_attn[0].heads

    def memory(self, mem: torch.Tensor, mask: torch.Tensor) -> Memory:
        """Memory tokens (B, N, D) and their mask (B, N) bool -> every layer's keys and values."""
        kv = [attn.keys_values(mem) for attn in self.cross_attn]
        return Memory(tuple(k for k, _ in kv), tuple(v for _, v in kv), mask.bool())

    def first_self_attention(self, h: torch.Tensor) -> torch.Tensor:
        """tgt (B, L, D) after the first layer's self-attention block: a constant tgt (learned queries) gives a
        constant result, which `__call__(..., after_first_self_attention=True)` then starts from."""
        return h + self.self_attn[0].self_attend(F.layer_norm(h, *self.norms[0][0]))

    def __call__(
        self, h: torch.Tensor, memory: Memory, value_shifts=None, after_first_self_attention: bool = False
    ) -> torch.Tensor:
        """tgt h (B, L, D) over `memory` -> (B, L, D). `value_shifts`: per layer a term (h, 1, d_head) added to
        every cross-attention value (the denoiser's timestep term, see `ChunkDenoiser`), or None.
        `after_first_self_attention`: h is `first_self_attention(tgt)` already."""
        bias = key_bias(memory.mask, self.heads)
        b = h.shape[0]
        for i, (norm1, norm2, norm3) in enumerate(self.norms):
            if i or not after_first_self_attention:
                h = h + self.self_attn[i].self_attend(F.layer_norm(h, *norm1))
            q = self.cross_attn[i].query(F.layer_norm(h, *norm2))
            shift = value_shifts[i] if value_shifts is not None else None
            h = h + self.cross_attn[i].attend(q, memory.keys[i], memory.values[i], bias, b, shift)
            h = h + self.ff[i](F.layer_norm(h, *norm3))
        return h


def _stamp(params: list[torch.Tensor]) -> tuple:
    """What identifies the parameters' current values: storages and in-place version counters."""
    return tuple([p.data_ptr() for p in params] + [p._version for p in params])


def packed(module: nn.Module, build: Callable[[nn.Module], Any], name: str = "_packed") -> Any:
    """`build(module)`, cached on the module and rebuilt when one of its parameters changed in place (an optimizer
    step, `load_state_dict`) or moved to other storage (`.to(device)`). A parameter replaced by a new object
    without either (assigning a new `nn.Parameter`) is not seen: call `unpack(module)` after doing that.

    The cache is a plain attribute: not a submodule, not in the state dict."""
    cached = module.__dict__.get(name)
    if cached is not None and _stamp(cached[0]) == cached[1]:
        return cached[2]
    params = list(module.parameters())
    with torch.no_grad():
        pack = build(module)
    module.__dict__[name] = (params, _stamp(params), pack)
    return pack


def unpack(module: nn.Module, name: str = "_packed") -> None:
    """Drop `module`'s packed weights (they are rebuilt at the next `packed` call)."""
    module.__dict__.pop(name, None)
