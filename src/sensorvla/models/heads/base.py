"""`ActionHead`: the interface every action expert implements, plus shared building blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from sensorvla.config import HeadConfig
from sensorvla.models.packed import Memory, PackedDecoder, transposed


class ActionHead(nn.Module):
    """Predicts an action chunk (B, H, D_a) in normalized units from a conditioning sequence.

    Subclasses implement `loss` (per-sample, masked over padded steps; the training path), and `memory` +
    `sample_memory` (inference, through the packed kernels of `models/packed.py`).
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

    def memory(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> Memory:
        """cond (B, N_c, D) + mask (B, N_c) -> the `Memory` every sampling step cross-attends to (eval only).

        Per token: the memory of a concatenation is the concatenation of memories (`Memory.cat`)."""
        raise NotImplementedError

    def sample_memory(
        self, memory: Memory, generator: torch.Generator | None = None, num_steps: int | None = None
    ) -> torch.Tensor:
        """A `memory` -> actions (B, H, D_a), eval semantics (no dropout)."""
        raise NotImplementedError

    def sample(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """cond (B, N_c, D) -> actions (B, H, D_a): `sample_memory(memory(cond))` in eval; with dropout active
        (training mode) the subclass's training forward runs instead."""
        with torch.no_grad():
            return self.sample_memory(self.memory(cond, cond_mask), generator, num_steps)

    def dropout_active(self) -> bool:
        """Whether a dropout layer would draw now (training mode and p > 0): sampling then uses the training
        forward, since the packed inference path has eval semantics."""
        return self.training and any(m.p > 0 for m in self.modules() if isinstance(m, nn.Dropout))


class DenoisingHead(ActionHead):
    """A sampling head over a denoiser network (models/heads/denoisers.py) named by `net_attr` (its checkpoint
    prefix): `sample` runs `integrate` from noise over the network's per-step output, through the packed step
    path (`memory` -> `context` once per call, `step` per step), or with dropout active the training forward.

    Subclasses give `step_times(num_steps, device)` (S,) and `integrate(fn, b, like, generator, num_steps)`, the
    loop that calls `fn(x, i, t)` once per step."""

    net_attr = "denoiser"

    @property
    def net(self) -> nn.Module:
        """The denoiser network (`denoiser` of the diffusion head, `velocity` of the flow head)."""
        return getattr(self, self.net_attr)

    def step_times(self, num_steps: int | None, device) -> torch.Tensor:
        """The (S,) times the network is evaluated at, in sampling order."""
        raise NotImplementedError

    def integrate(self, fn, b: int, like: torch.Tensor, generator, num_steps) -> torch.Tensor:
        """From noise (b, H, D_a) drawn with `generator` (dtype / device of `like`), the sampler's loop over `fn`."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, cond, cond_mask, generator=None, num_steps=None):
        """cond (B, N_c, D) -> actions (B, H, D_a); `num_steps` overrides the config."""
        net = self.net
        if not net.uses_step_path():  # dropout active: the training forward at every step
            b = cond.shape[0]
            return self.integrate(lambda x, i, t: net(x, t.expand(b), cond, cond_mask), b, cond, generator, num_steps)
        return self.sample_memory(self.memory(cond, cond_mask), generator, num_steps)

    def memory(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> Memory:
        """The network's keys / values of the conditioning."""
        return self.net.memory(cond, cond_mask)

    @torch.no_grad()
    def sample_memory(self, memory: Memory, generator=None, num_steps=None) -> torch.Tensor:
        """Sampling over a precomputed `memory` -> actions (B, H, D_a)."""
        net = self.net
        pack = net.pack()
        embs = net.step_embeddings(self.step_times(num_steps, memory.mask.device))
        ctx = net.context(memory)  # once per call
        b, like = memory.mask.shape[0], memory.keys[0]
        return self.integrate(lambda x, i, t: net.step(x, embs[i], ctx, pack), b, like, generator, num_steps)


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


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, heads, L, D / heads)."""
    b, length, d = x.shape
    return x.view(b, length, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d_head) -> (B, L, heads * d_head)."""
    b, heads, length, dh = x.shape
    return x.transpose(1, 2).reshape(b, length, heads * dh)


def _attend(attn: nn.MultiheadAttention, x: torch.Tensor, mem: torch.Tensor, mask, dropout_p: float) -> torch.Tensor:
    """`attn(x, mem, mem)` of a batch-first `nn.MultiheadAttention`: x (B, L, D), mem (B, N, D), mask (B, 1, 1, N)
    bool (True = attend) or None -> (B, L, D). Query, key and value are projected by slices of `in_proj_weight`
    (slicing the weight, not the packed activation: the packed path copies and zero-fills the (2, N, B, D)
    key/value block in every backward, a third of a demo training step on CPU)."""
    d, heads = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    if x is mem:
        q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
    else:
        q = F.linear(x, w[:d], b[:d])
        k, v = F.linear(mem, w[d : 2 * d], b[d : 2 * d]), F.linear(mem, w[2 * d :], b[2 * d :])
    a = F.scaled_dot_product_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), attn_mask=mask, dropout_p=dropout_p
    )
    return attn.out_proj(_merge_heads(a))


def decode(decoder: nn.TransformerDecoder, tgt: torch.Tensor, memory: torch.Tensor, memory_mask) -> torch.Tensor:
    """`decoder(tgt, memory, memory_key_padding_mask=~memory_mask)` for a pre-norm, batch-first decoder without a
    final norm: tgt (B, L, D), memory (B, N, D), memory_mask (B, N) bool (True = valid)
    -> (B, L, D). The same function and parameters as `nn.TransformerDecoder` (tests/models/test_heads_cached.py),
    about 1.15x faster to train on CPU (see `_attend`)."""
    if decoder.norm is not None or not all(layer.norm_first for layer in decoder.layers):
        raise ValueError("decode() computes pre-norm decoders without a final norm (norm_first=True, norm=None)")
    mask = memory_mask.bool()
    attn_mask = None if mask.device.type != "meta" and bool(mask.all()) else mask[:, None, None, :]
    h = tgt
    for layer in decoder.layers:
        if isinstance(layer, FSDPModule):  # an FSDP2 unit: only its own forward all-gathers its parameters
            h = layer(h, memory, memory_key_padding_mask=~mask)
            continue
        p_self = layer.self_attn.dropout if layer.training else 0.0
        p_cross = layer.multihead_attn.dropout if layer.training else 0.0
        hn = layer.norm1(h)
        h = h + layer.dropout1(_attend(layer.self_attn, hn, hn, None, p_self))
        h = h + layer.dropout2(_attend(layer.multihead_attn, layer.norm2(h), memory, attn_mask, p_cross))
        ff = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(h)))))
        h = h + layer.dropout3(ff)
    return h


class DecoderPack:
    """A head's decoder stack packed for inference (`models/packed.py`): the decoder over a `Memory`, the
    head's condition projection and output modules (`cond_proj`, `output`), and where the head has them, its
    learned queries, packed input projection and horizon positions."""

    def __init__(self, head: nn.Module):
        self.decoder = PackedDecoder(head.decoder)
        # the modules themselves (their hooks run): cond_proj once per call, out once per step (two small ops)
        self.cond_proj, self.output = head.cond_proj, head.out
        if hasattr(head, "in_proj"):  # a denoiser
            self.in_proj = (transposed(head.in_proj.weight), head.in_proj.bias.detach())
        self.pos = head.pos.detach() if hasattr(head, "pos") else None
        self.queries = head.queries.detach() if hasattr(head, "queries") else None
        # the learned queries' first self-attention block depends on the parameters alone: computed once here
        self.queries_attended = None if self.queries is None else self.decoder.first_self_attention(self.queries)

    def memory(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> Memory:
        """cond (B, N_c, D_c) -> the decoder's memory of `cond_proj(cond)`."""
        return self.decoder.memory(self.cond_proj(cond), cond_mask)

    def decode_queries(self, memory: Memory) -> torch.Tensor:
        """The learned queries (1, H, D) decoded over `memory` -> (B, H, D)."""
        h = self.queries_attended.expand(memory.mask.shape[0], -1, -1)
        return self.decoder(h, memory, after_first_self_attention=True)
