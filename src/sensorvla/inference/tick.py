"""`FastTick`: the model work of one runner call once the VL part is known, as one module over the policy's own.

A call (and every call of fast-slow mode, which reuses the VL features) runs: the sensor encoder on the window, the
fusion's sensor and state tokens, the head's keys / values of them next to those of the reused VL tokens (`Memory`)
and the head's sampling. `PolicyRunner` runs it eagerly (its two halves timed apart), or, with `compile_model` on
CPU, as one graph: `export_tick` traces it with `torch.export` (the number of VL tokens left dynamic) and compiles it
ahead of time with AOTInductor into a shared library called from C++, no Python per op and no guard checks. It is
the same modules and parameters (one implementation); outputs equal eager within float rounding
(tests/inference/test_tick.py). Measured against `torch.compile` of the same modules in docs/decisions.md.

A sampling head's starting noise is drawn outside (`DenoisingHead.noise`, with the runner's generator) and passed
in, so an exported graph holds no random-number generator.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from sensorvla.models.heads.base import DenoisingHead, Memory

logger = logging.getLogger(__name__)

TickInputs = tuple[Any, ...]  # (sensors, state, v_proj, vl_mask, v_mem, noise): `FastTick`


class FastTick(nn.Module):
    """The sensor encoder, the fusion's tail and the head of a `VLAPolicy`, fed the reused VL part.

    Inputs (B = 1 in the runner): sensors, the batch's sensor part (`sensor` (B, T_s, C_s), `sensor_mask` (B, T_s),
    `has_sensor` (B,), and each declared stream's `sensor.<k>` (B, T_k, *S_k) + `sensor_mask.<k>` (B, T_k)),
    state (B, D_st) float | None, v_proj (B, N_vl, D) the projected VL tokens, vl_mask (B, N_vl) bool, v_mem the
    head's `Memory` of v_proj, or its fields as a plain tuple (keys, values, mask) (None when the fusion changes the
    VL tokens: the whole conditioning is then read here), noise (B, H, D_a) the sampling head's starting noise |
    None. Output: the normalized chunk (B, H, D_a); for a policy with the wrench output the pair (chunk, wrench
    (B, H, C_f) normalized), the wrench head reading the same conditioning.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def sensor(self, sensors: dict[str, torch.Tensor]):
        """The sensor tokens (B, N_s, D) and their mask, or (None, None) for a policy without a sensor input."""
        if self.policy.sensor_encoder is None:
            return None, None
        return self.policy.sensor_encoder(sensors)

    def head(self, s_tok, s_mask, state, v_proj, vl_mask, v_mem: Memory | tuple | None, noise):
        """Fusion tail, the head's memory of it next to the VL part's, and sampling -> chunk (B, H, D_a), or
        (chunk, wrench (B, H, C_f)) with the wrench output."""
        pol = self.policy
        wrench_head = getattr(pol, "wrench_head", None)
        v, tail, tail_mask = pol.fusion.parts(v_proj, vl_mask, s_tok, s_mask, None if state is None else state.float())
        if v_mem is None or wrench_head is not None:  # the whole conditioning
            cond = v if tail is None else torch.cat([v, tail], dim=1)
            mask = vl_mask.bool() if tail is None else torch.cat([vl_mask.bool(), tail_mask], dim=1)
        if v_mem is None:  # the fusion changed the VL tokens: the whole conditioning's memory
            memory = pol.head.memory(cond, mask)
        else:
            v_mem = Memory(*v_mem)
            memory = v_mem if tail is None else v_mem.cat(pol.head.memory(tail, tail_mask))
        chunk = pol.head.sample_memory(memory, noise=noise)
        return chunk if wrench_head is None else (chunk, wrench_head(cond, mask))

    def forward(self, sensors, state, v_proj, vl_mask, v_mem, noise):
        """`head(*sensor(...), ...)`: the whole tick (see the class docstring for the inputs)."""
        s_tok, s_mask = self.sensor(sensors)
        return self.head(s_tok, s_mask, state, v_proj, vl_mask, v_mem, noise)


def starting_noise(policy: nn.Module, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    """A sampling head's starting noise for one sample (drawn with `generator`), None for a regression head."""
    head = policy.head
    return head.noise(like.shape[0], like, generator) if isinstance(head, DenoisingHead) else None


def dynamic_shapes(inputs: TickInputs, max_vl_tokens: int = 1 << 16) -> tuple:
    """`torch.export`'s dynamic shapes of the tick's `inputs`: the number of VL tokens (the instruction's length and
    the views' sizes set it) is free, every other size is the example's."""
    from torch.export import Dim

    n_vl = Dim("vl_tokens", min=1, max=max_vl_tokens)
    v_mem = inputs[4]
    mem_shapes = None
    if v_mem is not None:
        per_layer = tuple({2: n_vl} for _ in v_mem[0])
        mem_shapes = (per_layer, per_layer, {1: n_vl})
    sensors = {k: None for k in inputs[0]}  # every stream's window: static
    return (sensors, None, {1: n_vl}, {1: n_vl}, mem_shapes, None)


def export_tick(tick: FastTick, inputs: TickInputs):
    """`tick` traced by `torch.export` on example `inputs` (`v_mem` as a plain tuple; the number of VL tokens
    dynamic) and compiled by AOTInductor; returns a callable with `tick`'s signature. One eager call first fills
    the heads' lazy caches (the DDIM schedule). Needs a C++ compiler (inductor's `cpp.cxx`); takes tens of seconds
    (once per runner)."""
    from torch.export import export

    t0 = time.perf_counter()
    with torch.no_grad():
        tick(*inputs)
        program = export(tick, tuple(inputs), dynamic_shapes=dynamic_shapes(inputs))
        compiled = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program))
    logger.info("exported and compiled the runner's tick in %.1f s (AOTInductor)", time.perf_counter() - t0)
    return compiled
