"""Activation memory of one block, measured by running it on the meta device (no weights are materialized).

`probe(fn, make_inputs)` runs `fn(*inputs)` under `LiveBytes` and, when something needs gradients, its backward,
and returns `Probe(fwd_peak, retained, bwd_peak)`:
- `fwd_peak`: the most bytes live during the forward (its inputs, temporaries, saved tensors, output);
- `retained`: what stays alive after the forward besides the output: the tensors saved for backward, and the
  inputs when activation checkpointing keeps them for the recompute;
- `bwd_peak`: the most bytes live during the backward (retained + output + its gradient + temporaries).
The whole step is then a sum over blocks (`plan/activations.py`). Attention on meta tensors would fall back to
the math kernel (which saves the L x L probabilities); `emulate_sdpa(device)` routes it to the fused kernel the
target device runs (flash for CPU, flash / memory-efficient for CUDA), whose saved tensors are q, k, v, out and
the log-sum-exp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from sensorvla.plan.tracker import LiveBytes


@dataclass(frozen=True)
class Probe:
    """Bytes of one block invocation (see module docstring)."""

    fwd_peak: int
    retained: int
    bwd_peak: int
    out_bytes: int


def _sdpa_on(device_type: str, orig: Callable) -> Callable:
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta":
            return orig(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if device_type == "cpu":  # the CPU flash kernel takes GQA shapes and masks (saves a float copy of the mask)
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
            )[0]
        if k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        grad = q.requires_grad or k.requires_grad or v.requires_grad
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale
        )[0]

    return sdpa


@contextlib.contextmanager
def emulate_sdpa(device_type: str) -> Iterator[None]:
    """Within the block, `F.scaled_dot_product_attention` on meta tensors runs the target device's fused kernel."""
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_on(device_type, orig)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def probe(
    fn: Callable,
    make_inputs: Callable[[], tuple],
    *,
    params: list[torch.Tensor] = (),
    ignore: list[torch.Tensor] = (),
    backward: bool = True,
) -> Probe:
    """Run `fn(*make_inputs())` (and its backward when the output needs grad) and account its memory.

    Args:
        fn: the block (a module or a function of its inputs).
        params: the block's parameters: not counted (they are weights); their `.grad` buffers are pre-allocated.
        make_inputs: builds the block's inputs (meta tensors); they are counted while alive, so an input the
            block keeps for backward (activation checkpointing) shows up in `retained`.
        ignore: tensors shared by every block (position embeddings): never counted here, once globally.
        backward: run the backward (training) or only the forward.
    """
    params = list(params)
    for p in params:  # as in gradient accumulation: the .grad buffers exist, backward adds into them
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    inputs = make_inputs()
    device = next(t.device.type for t in tree_leaves(inputs) if isinstance(t, torch.Tensor))
    with LiveBytes(ignore=[*params, *[p.grad for p in params if p.grad is not None], *ignore], device=device) as lb:
        lb.track(*[t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)])
        out = fn(*inputs)
        del inputs
        fwd_peak = lb.peak
        lb.mark()
        out_bytes = _nbytes(out)
        retained = max(0, lb.current - out_bytes)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        bwd_peak = 0
        if backward and outs:
            grads = [torch.ones_like(t) for t in outs]
            lb.mark()
            torch.autograd.backward(outs, grads)
            bwd_peak = lb.peak
        del out, outs
    for p in params:
        p.grad = None
    return Probe(fwd_peak=fwd_peak, retained=retained, bwd_peak=bwd_peak, out_bytes=out_bytes)
