"""`ActionHead`: the interface every action expert implements, plus shared building blocks."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from sensorvla.config import HeadConfig
from sensorvla.models.attention import attend, drop, keys_values, queries, self_attend


class Memory(NamedTuple):
    """A conditioning sequence as a decoder's cross-attention sees it, computed once and reused: per layer the
    keys and values (B, h, N, d_head), and the key mask (B, N) bool (True = attend).

    Keys and values are per token (a linear map of each token), so the memory of a concatenated sequence is
    the concatenation of the parts' memories (`cat`): fast-slow inference keeps the VL tokens' part."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: torch.Tensor

    def cat(self, other: Memory) -> Memory:
        """This memory's tokens followed by `other`'s."""
        return Memory(
            tuple(torch.cat([a, b], dim=2) for a, b in zip(self.keys, other.keys, strict=True)),
            tuple(torch.cat([a, b], dim=2) for a, b in zip(self.values, other.values, strict=True)),
            torch.cat([self.mask, other.mask], dim=1),
        )


class ActionHead(nn.Module):
    """Predicts an action chunk (B, H, D_a) in normalized units from a conditioning sequence.

    Subclasses implement `loss` (per-sample, masked over padded steps; the training path), and `memory` +
    `sample_memory` (inference: the conditioning's `Memory` once, then sampling over it).
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
        """cond (B, N_c, D) + mask (B, N_c) -> the `Memory` every sampling step cross-attends to.

        Per token: the memory of a concatenation is the concatenation of memories (`Memory.cat`)."""
        raise NotImplementedError

    def sample_memory(
        self,
        memory: Memory,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A `memory` -> actions (B, H, D_a); a sampling head starts from `noise` when given (else it draws it with
        `generator`)."""
        raise NotImplementedError

    def sample(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """cond (B, N_c, D) -> actions (B, H, D_a): `sample_memory(memory(cond))`, without gradients."""
        with torch.no_grad():
            return self.sample_memory(self.memory(cond, cond_mask), generator, num_steps)


class DenoisingHead(ActionHead):
    """A sampling head over a denoiser network (models/heads/denoisers.py) named by `net_attr` (its checkpoint
    prefix): `sample` runs `integrate` from noise over the network's per-step output, through its step path
    (`memory` -> `context` once per call, `step` per step), or with dropout active the training forward.

    Subclasses give `step_times(num_steps, device)` (S,) and `integrate(fn, x, num_steps)`, the loop from the
    starting noise x (`noise`) that calls `fn(x, i, t)` once per step."""

    net_attr = "denoiser"

    @property
    def net(self) -> nn.Module:
        """The denoiser network (`denoiser` of the diffusion head, `velocity` of the flow head)."""
        return getattr(self, self.net_attr)

    def step_times(self, num_steps: int | None, device) -> torch.Tensor:
        """The (S,) times the network is evaluated at, in sampling order."""
        raise NotImplementedError

    def noise(self, b: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The sampler's starting noise (b, H, D_a), drawn with `generator` (on its device; None = the global RNG),
        in the dtype and on the device of `like`."""
        dev = generator.device if generator is not None else like.device
        x = torch.randn((b, self.horizon, self.action_dim), generator=generator, device=dev)
        return x.to(like.device, like.dtype)

    def integrate(self, fn, x: torch.Tensor, num_steps) -> torch.Tensor:
        """From the starting noise x (b, H, D_a) (`noise`), the sampler's loop over `fn`."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, cond, cond_mask, generator=None, num_steps=None):
        """cond (B, N_c, D) -> actions (B, H, D_a); `num_steps` overrides the config."""
        net = self.net
        if not net.uses_step_path():  # dropout active: the training forward at every step
            b = cond.shape[0]
            x = self.noise(b, cond, generator)
            return self.integrate(lambda x, i, t: net(x, t.expand(b), cond, cond_mask), x, num_steps)
        return self.sample_memory(self.memory(cond, cond_mask), generator, num_steps)

    def memory(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> Memory:
        """The network's keys / values of the conditioning."""
        return self.net.memory(cond, cond_mask)

    @torch.no_grad()
    def sample_memory(self, memory: Memory, generator=None, num_steps=None, noise=None) -> torch.Tensor:
        """Sampling over a precomputed `memory` -> actions (B, H, D_a), from `noise` (B, H, D_a) when given (an
        exported graph takes it as an input), else from `noise(B, ..., generator)`."""
        net = self.net
        embs = net.step_embeddings(self.step_times(num_steps, memory.mask.device))
        ctx = net.context(memory)  # once per call
        x = noise if noise is not None else self.noise(memory.mask.shape[0], memory.keys[0], generator)
        return self.integrate(lambda x, i, t: net.step(x, embs[i], ctx), x, num_steps)


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


def _pre_norm(decoder: nn.TransformerDecoder) -> None:
    if decoder.norm is not None or not all(layer.norm_first for layer in decoder.layers):
        raise ValueError("decode() computes pre-norm decoders without a final norm (norm_first=True, norm=None)")


def decoder_memory(decoder: nn.TransformerDecoder, mem: torch.Tensor, mask: torch.Tensor) -> Memory:
    """Memory tokens (B, N, D) and their mask (B, N) bool -> every layer's cross-attention keys and values."""
    _pre_norm(decoder)
    kv = [keys_values(layer.multihead_attn, mem) for layer in decoder.layers]
    return Memory(tuple(k for k, _ in kv), tuple(v for _, v in kv), mask.bool())


def decode(
    decoder: nn.TransformerDecoder,
    tgt: torch.Tensor,
    memory: torch.Tensor | Memory,
    memory_mask: torch.Tensor | None = None,
    value_shifts: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """`decoder(tgt, memory, memory_key_padding_mask=~memory_mask)` for a pre-norm, batch-first decoder without a
    final norm: tgt (B, L, D), memory (B, N, D) with memory_mask (B, N) bool (True = valid), or a precomputed
    `Memory` (its keys and values reused: sampling steps, fast-slow ticks) -> (B, L, D). The same function and
    parameters as `nn.TransformerDecoder` (tests/models/test_heads_cached.py), about 1.15x faster to train on CPU
    (see `models/attention.py`). `value_shifts`: per layer a term (h, 1, d_head) added to every cross-attention
    value (the denoiser's timestep term, see `ChunkDenoiser`), or None."""
    _pre_norm(decoder)
    mask = memory.mask if isinstance(memory, Memory) else memory_mask.bool()
    # eager: no mask when every key is valid (the common case); a traced graph keeps it (no data-dependent branch)
    static = mask.device.type == "meta" or torch.compiler.is_compiling()
    attn_mask = None if not static and bool(mask.all()) else mask[:, None, None, :]
    h = tgt
    for i, layer in enumerate(decoder.layers):
        if isinstance(layer, FSDPModule):  # an FSDP2 unit: only its own forward all-gathers its parameters
            h = layer(h, memory, memory_key_padding_mask=~mask)
            continue
        h = h + drop(layer.dropout1, self_attend(layer.self_attn, layer.norm1(h)))
        cross = layer.multihead_attn
        k, v = (memory.keys[i], memory.values[i]) if isinstance(memory, Memory) else keys_values(cross, memory)
        shift = value_shifts[i] if value_shifts is not None else None
        h = h + drop(layer.dropout2, attend(cross, queries(cross, layer.norm2(h)), k, v, attn_mask, shift))
        ff = layer.linear2(drop(layer.dropout, layer.activation(layer.linear1(layer.norm3(h)))))
        h = h + drop(layer.dropout3, ff)
    return h
