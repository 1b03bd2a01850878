"""The networks inside the sampling heads (diffusion, flow): noisy chunk x_t + time + conditioning -> (B, H, D_a).

`--model.head.denoiser` picks one:
- `decoder`: a Transformer decoder over the horizon positions cross-attends to every conditioning token at every
  denoising step (`ChunkDenoiser`). A step costs about what the regression head costs once.
- `mlp`: the conditioning is read once per sampling call: learned horizon queries cross-attend to it through a
  Transformer decoder (the regression head's computation) and give a plan z (B, H, D); each denoising step is
  then one small MLP-Mixer block over the noisy chunk (`PlanDenoiser`; MAR's per-token diffusion MLP, with a
  token-mixing layer so the horizon positions denoise together). A step costs a fifth of a regression pass.

Both: `forward(x, t, cond, mask)` is the training path; sampling runs `memory` (per token, reusable across
calls: see `Memory.cat`) -> `context` once per call, `step_embeddings` once per call and `step` per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sensorvla.config import HeadConfig
from sensorvla.models.heads.base import Memory, decode, decoder_memory, timestep_embedding


class StepEmbedding(NamedTuple):
    """One denoising step's timestep terms: temb (1, 1, D) and, per decoder layer, its value shift
    (h, 1, d_head) (`ChunkDenoiser`; empty for `PlanDenoiser`)."""

    temb: torch.Tensor
    value_shift: tuple[torch.Tensor, ...]


def _decoder(cfg: HeadConfig) -> nn.TransformerDecoder:
    d = cfg.hidden_dim
    layer = nn.TransformerDecoderLayer(
        d, cfg.num_heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerDecoder(layer, cfg.num_layers)


class _Denoiser(nn.Module):
    """What both denoisers share: an input projection `in_proj`, the timestep MLP `t_mlp`, the condition
    projection `cond_proj`, a decoder over it and the output `out` (each subclass builds them in its own order,
    which fixes its parameters' order and initial values)."""

    def _build(self, cfg: HeadConfig, cond_dim: int, between=None) -> None:
        """in_proj, `between()` (extra parameters created here), t_mlp, cond_proj, decoder, out."""
        d = self.dim = cfg.hidden_dim
        self.in_proj = nn.Linear(cfg.action_dim, d)
        if between is not None:
            between()
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.cond_proj = nn.Linear(cond_dim, d) if cond_dim != d else nn.Identity()
        self.decoder = _decoder(cfg)
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.action_dim))

    def temb(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) or (S,) timesteps -> their embeddings (B, D)."""
        return self.t_mlp(timestep_embedding(t, self.dim))

    def memory(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> Memory:
        """cond (B, N_c, D_c) + mask -> the decoder's cross-attention keys / values."""
        return decoder_memory(self.decoder, self.cond_proj(cond), cond_mask)

    def uses_step_path(self) -> bool:
        """Whether sampling may use `step` (eval semantics): not while dropout is active."""
        return not (self.training and any(m.p > 0 for m in self.modules() if isinstance(m, nn.Dropout)))


class ChunkDenoiser(_Denoiser):
    """Noisy chunk (B, H, D_a) + timestep + cond -> (B, H, D_a): horizon position embeddings, timestep
    MLP added to every step, and a pre-norm Transformer decoder that cross-attends to the condition.

    `forward` is the training path (one call per step, through `decode`: the function of `nn.TransformerDecoder`).
    Sampling computes the same function with the per-call work hoisted out of the loop: the memory is
    `cond_proj(cond) + temb`, so its cross-attention keys and values split into a per-call part (`memory`) and
    a per-step term. The key term `W_k temb` shifts every key's logit by the same amount, which softmax ignores;
    the value term `W_v temb` adds the same vector to every value, so it passes through the attention unchanged
    (weights sum to 1) and is added after it. Equality with `forward`: tests/models/test_heads_cached.py.
    """

    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__()

        def positions() -> None:
            self.pos = nn.Parameter(torch.randn(1, cfg.horizon, cfg.hidden_dim) * 0.02)

        self._build(cfg, cond_dim, positions)  # in_proj, pos, t_mlp, cond_proj, decoder, out (checkpoint order)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        """Noisy chunk x (B, H, D_a), time t (B,), cond (B, N_c, D) + mask -> output (B, H, D_a)."""
        temb = self.temb(t).unsqueeze(1)
        h = self.in_proj(x) + self.pos + temb
        memory = self.cond_proj(cond) + temb
        return self.out(decode(self.decoder, h, memory, cond_mask))

    def context(self, memory: Memory) -> Memory:
        """A sampling call's context: the memory itself (every step cross-attends to it)."""
        return memory

    def step_embeddings(self, t: torch.Tensor) -> list[StepEmbedding]:
        """(S,) timesteps of a sampling call (shared by the batch) -> one `StepEmbedding` per step."""
        temb = self.temb(t)  # (S, D)
        shifts = []
        for layer in self.decoder.layers:  # W_v temb per layer, (S, h, 1, d_head)
            attn, d = layer.multihead_attn, self.dim
            shifts.append(F.linear(temb, attn.in_proj_weight[2 * d :]).view(len(t), attn.num_heads, 1, -1))
        return [StepEmbedding(temb[i].view(1, 1, -1), tuple(s[i] for s in shifts)) for i in range(len(t))]

    def step(self, x: torch.Tensor, emb: StepEmbedding, ctx: Memory) -> torch.Tensor:
        """One sampling step (eval semantics: no dropout): x (B, H, D_a) -> (B, H, D_a), equal to `forward`."""
        h = self.in_proj(x) + (self.pos + emb.temb)
        return self.out(decode(self.decoder, h, ctx, value_shifts=emb.value_shift))


class PlanDenoiser(_Denoiser):
    """Noisy chunk (B, H, D_a) + timestep + cond -> (B, H, D_a) through a plan read from the condition once.

    plan z = decoder(learned horizon queries, cond_proj(cond)) (B, H, D), the regression head's computation; then
    h = in_proj(x) + z + temb; h += mix(LN(h)) across the H positions (a Linear over the horizon axis);
    h += MLP(LN(h)) per position; out(h). Sampling decodes z once per call (`context`) and runs the block per step.
    """

    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__()
        self._build(cfg, cond_dim)
        d = cfg.hidden_dim
        self.queries = nn.Parameter(torch.randn(1, cfg.horizon, d) * 0.02)
        self.mix_norm, self.mix = nn.LayerNorm(d), nn.Linear(cfg.horizon, cfg.horizon)
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def plan(self, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        """cond (B, N_c, D_c) + mask -> the plan z (B, H, D) (training path)."""
        q = self.queries.expand(cond.shape[0], -1, -1)
        return decode(self.decoder, q, self.cond_proj(cond), cond_mask)

    def block(self, x: torch.Tensor, temb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One denoising evaluation given the plan: x (B, H, D_a), temb (B or 1, 1, D), z (B, H, D) -> (B, H, D_a)."""
        h = self.in_proj(x) + z + temb
        h = h + self.mix(self.mix_norm(h).transpose(1, 2)).transpose(1, 2)
        h = h + self.mlp(self.mlp_norm(h))
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        """Noisy chunk x (B, H, D_a), time t (B,), cond (B, N_c, D) + mask -> output (B, H, D_a)."""
        return self.block(x, self.temb(t).unsqueeze(1), self.plan(cond, cond_mask))

    def context(self, memory: Memory) -> torch.Tensor:
        """A sampling call's context: the plan z (B, H, D) decoded over `memory`."""
        return decode(self.decoder, self.queries.expand(memory.mask.shape[0], -1, -1), memory)

    def step_embeddings(self, t: torch.Tensor) -> list[StepEmbedding]:
        """(S,) timesteps of a sampling call -> one `StepEmbedding` per step (no value shifts)."""
        temb = self.temb(t)
        return [StepEmbedding(temb[i].view(1, 1, -1), ()) for i in range(len(t))]

    def step(self, x: torch.Tensor, emb: StepEmbedding, z: torch.Tensor) -> torch.Tensor:
        """One sampling step (eval semantics): x (B, H, D_a) and the plan z -> (B, H, D_a), equal to `forward`."""
        return self.block(x, emb.temb, z)


DENOISERS = {"decoder": ChunkDenoiser, "mlp": PlanDenoiser}


def build_denoiser(cfg: HeadConfig, cond_dim: int) -> _Denoiser:
    """The denoiser named by `--model.head.denoiser` (decoder, mlp)."""
    if cfg.denoiser not in DENOISERS:
        raise ValueError(f"--model.head.denoiser {cfg.denoiser!r} is unknown; choose one of {sorted(DENOISERS)}")
    return DENOISERS[cfg.denoiser](cfg, cond_dim)
