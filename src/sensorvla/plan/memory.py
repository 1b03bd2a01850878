"""The planner's arithmetic: parameters per group, weights / gradients / AdamW states by dtype, the VL cache on
disk, and peak memory per GPU for DDP and FSDP2 at N GPUs. Works on any module (meta or real); no tensor is read.

Per-GPU peak (bytes), with W weights+buffers, G gradients (trainable params, their dtype), O AdamW states
(exp_avg + exp_avg_sq, the params' dtype, + a 4-byte step per tensor) and D the largest of the step's dynamic
moments (`dynamic_peak`: a micro-batch's activations with the gradients live at that moment, the optimizer
step with its temporaries, and the loop's batch hand-overs):
- 1 process:     W + O + D
- DDP, N > 1:    W + O + G + D                 (the reducer's flat gradient buckets are a second copy of G)
- FSDP2, N > 1:  W/N + W_root + 2 W_unit + O/N + D with G -> G/N + G_root + G_unit and the step temporaries / N,
  where units are the `*DecoderLayer` modules (as `training/distributed.wrap_model` shards them) and root is
  everything else: the root's parameters stay gathered from its forward to the end of backward, two units are
  gathered at a time (the current one and the prefetched next), and a unit's (and the root's) gradients exist
  unsharded until their reduce-scatter.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from sensorvla.training.param_groups import group_of

ADAM_STATES = 2  # exp_avg, exp_avg_sq
STEP_BYTES = 4  # AdamW's per-tensor step counter (float32 scalar)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


@dataclass
class GroupRow:
    """Parameters of one optimizer group (`training/param_groups.group_of`), trainable or frozen."""

    group: str
    params: int = 0
    trainable: int = 0
    tensors: int = 0


@dataclass
class States:
    """Bytes by dtype name of the persistent training state."""

    weights: dict[str, int] = field(default_factory=dict)
    grads: dict[str, int] = field(default_factory=dict)
    optimizer: dict[str, int] = field(default_factory=dict)

    @property
    def w(self) -> int:
        """Weight bytes, all dtypes."""
        return sum(self.weights.values())

    @property
    def g(self) -> int:
        """Gradient bytes, all dtypes."""
        return sum(self.grads.values())

    @property
    def o(self) -> int:
        """Optimizer-state bytes, all dtypes."""
        return sum(self.optimizer.values())


def group_rows(model: nn.Module) -> list[GroupRow]:
    """Parameter counts per group, in first-seen order (tied parameters counted once)."""
    rows: dict[str, GroupRow] = {}
    for name, p in model.named_parameters():
        row = rows.setdefault(group_of(name), GroupRow(group_of(name)))
        row.params += p.numel()
        row.tensors += 1
        if p.requires_grad:
            row.trainable += p.numel()
    return list(rows.values())


def states(model: nn.Module, optimizer: bool = True) -> States:
    """Weights (parameters + buffers), gradients and AdamW states of `model`, by dtype."""
    out = States()
    w, g, o = defaultdict(int), defaultdict(int), defaultdict(int)
    for p in model.parameters():
        w[dtype_name(p.dtype)] += tensor_bytes(p)
        if p.requires_grad:
            g[dtype_name(p.dtype)] += tensor_bytes(p)
            if optimizer:
                o[dtype_name(p.dtype)] += ADAM_STATES * tensor_bytes(p)
                o["float32"] += STEP_BYTES
    for b in model.buffers():
        w[dtype_name(b.dtype)] += tensor_bytes(b)
    out.weights, out.grads, out.optimizer = dict(w), dict(g), dict(o)
    return out


def optimizer_transient(model: nn.Module, groups: list[list[nn.Parameter]], impl: str) -> int:
    """Temporaries of one AdamW step: `for-loop` (torch's default on CPU) makes two param-sized temporaries per
    tensor in turn; `foreach` (the CUDA default) one state-sized list per param group; `fused` none."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable or impl == "fused":
        return 0
    if impl == "foreach":
        return max(sum(tensor_bytes(p) for p in grp if p.requires_grad) for grp in groups) if groups else 0
    if impl == "for-loop":
        return 2 * max(tensor_bytes(p) for p in trainable)
    raise ValueError(f"--optimizer-impl {impl!r}: choose for-loop, foreach or fused")


def is_fsdp_unit(module: nn.Module) -> bool:
    """The modules `training/distributed.wrap_model` shards separately under FSDP2."""
    return module.__class__.__name__.endswith("DecoderLayer")


@dataclass
class Units:
    """FSDP2 sharding units: bytes of the root (everything outside units) and of the largest unit."""

    root_w: int
    root_g: int
    unit_w: int
    unit_g: int
    count: int


def fsdp_units(model: nn.Module, without: nn.Module | None = None) -> Units:
    """FSDP2 units of the model (decoder layers) and the root unit: their weight and gradient bytes. `without`: a
    submodule the run does not hold (the backbone of a stage 1 from the VL cache), left out of both."""
    skip = without if without is not None else nn.Module()  # an empty module leaves nothing out
    gone = {id(p) for p in skip.parameters()}
    gone_modules = {id(m) for m in skip.modules()}
    units = [m for m in model.modules() if is_fsdp_unit(m) and id(m) not in gone_modules]
    in_unit = {id(p) for u in units for p in u.parameters()}
    params = [p for p in model.parameters() if id(p) not in gone]
    root = [p for p in params if id(p) not in in_unit]
    unit_w = max((sum(tensor_bytes(p) for p in u.parameters()) for u in units), default=0)
    unit_g = max((sum(tensor_bytes(p) for p in u.parameters() if p.requires_grad) for u in units), default=0)
    gone_buffers = {id(b) for b in skip.buffers()}
    buffers = [b for b in model.buffers() if id(b) not in gone_buffers]
    return Units(
        root_w=sum(tensor_bytes(p) for p in root) + sum(tensor_bytes(b) for b in buffers),
        root_g=sum(tensor_bytes(p) for p in root if p.requires_grad),
        unit_w=unit_w,
        unit_g=unit_g,
        count=len(units),
    )


@dataclass(frozen=True)
class Dynamic:
    """What comes and goes during a step, on top of weights and AdamW states (bytes).

    Args:
        act: the activation peak of a micro-batch (batch included, gradients excluded).
        act_grads: gradient bytes live at that peak (all of G with accumulation, part of it otherwise).
        opt_tmp: temporaries of the optimizer step (gradients are all live then).
        batch: the collated micro-batch.
        accumulate: grad-accum > 1 (gradients stay allocated between micro-batches of a step).
        validation: the run validates (2 batches alive at once, gradients already freed).
    """

    act: int
    act_grads: int
    opt_tmp: int
    batch: int
    accumulate: bool = True
    validation: bool = True


def dynamic_peak(d: Dynamic, g_total: int, g: int, opt_tmp: int | None = None) -> int:
    """The largest of the step's moments with `g` gradient bytes on this GPU (`g_total` unsharded): the micro-batch
    peak; the optimizer step (all gradients + its temporaries); collating the next micro-batch while the previous
    one is still bound (2 batches, plus the gradients when accumulating); validation (2 batches: the previous and the
    new validation batch; the training window's batches are released with it, gradients freed by zero_grad)."""
    scale = g / g_total if g_total else 0.0
    moments = [
        d.act + int(d.act_grads * scale),
        g + (d.opt_tmp if opt_tmp is None else opt_tmp),
        2 * d.batch + (g if d.accumulate else 0),
    ]
    if d.validation:
        moments.append(2 * d.batch)
    return max(moments)


def per_gpu_peak(st: States, units: Units, d: Dynamic, strategy: str, n: int) -> int:
    """Peak bytes on one GPU for `strategy` (`ddp` or `fsdp`) at `n` GPUs (module docstring)."""
    if n < 1:
        raise ValueError("--gpus entries must be >= 1")
    if strategy == "ddp" or n == 1:
        buckets = st.g if n > 1 else 0
        return st.w + st.o + buckets + dynamic_peak(d, st.g, st.g)
    if strategy != "fsdp":
        raise ValueError(f"strategy {strategy!r}: ddp or fsdp")
    params = st.w // n + units.root_w + 2 * units.unit_w
    grads = st.g // n + units.root_g + units.unit_g
    return params + st.o // n + dynamic_peak(d, st.g, grads, d.opt_tmp // n)


def cache_bytes(num_samples: int, tokens_per_sample: int, hidden: int, cache_dtype: str) -> int:
    """Size on disk of the stage-1 VL cache (training/feature_cache.py): its token rows (features, positions,
    masks, as `feature_cache.estimate_bytes` counts them) + the JSON index (about 16 bytes per sample)."""
    from sensorvla.training.feature_cache import estimate_bytes

    return estimate_bytes(num_samples, tokens_per_sample, hidden, cache_dtype) + INDEX_BYTES_PER_SAMPLE * num_samples


INDEX_BYTES_PER_SAMPLE = 16  # sample id + row offset in shard-*.index.json
