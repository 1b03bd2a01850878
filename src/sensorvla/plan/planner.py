"""`sensorvla plan`: how much memory a training config needs, computed on the meta device (no weights).

`plan(cfg)` builds the policy exactly as `build_policy` does (same backbone config, LoRA injection, freezing)
but under `torch.device("meta")`, counts parameters and training state from it (`plan/memory.py`), gets the
micro-batch's token / patch counts from the real processor, and probes each block's activations on meta
tensors (`plan/activations.py`). Scenarios: the configured stage, and for a frozen stage 1 both the uncached
run (VL forward every step) and the cached one (`--train.use-cache`). Formulas and calibration: docs/scaling.md.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sensorvla.config import SensorVLAConfig
from sensorvla.plan import memory
from sensorvla.plan.activations import (
    Block,
    Shapes,
    sample_shapes,
    step_peak,
    tail_block,
    vl_blocks,
    vl_token_count,
)
from sensorvla.training.param_groups import aligned_table

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Insert the needle slowly and stop when you feel contact."
# Defaults for shapes that normally come from the dataset (--data.dataset-dir); each can be set explicitly.
NO_DATASET_DEFAULTS = {"views": 1, "image_size": (224, 224), "action_dim": 7, "sensor_channels": 33, "samples": 15000}
# Whether a stage-1 run from the VL cache holds the backbone's weights: it does not (the trainer builds the policy
# without them, `build_policy(vl_weights=False)`). tests/plan/test_calibration.py fails when that changes.
CACHED_STAGE1_LOADS_BACKBONE = False


@dataclass
class Scenario:
    """One way of running the config: activation peaks with / without checkpointing and per-GPU peaks."""

    name: str
    states: memory.States
    dynamic: memory.Dynamic  # with the configured activation checkpointing
    act_saved: int
    act_peak_off: int  # activations of a micro-batch (batch included, gradients excluded)
    act_peak_on: int
    blocks: list[Block] = field(default_factory=list)
    per_gpu: dict[str, dict[int, int]] = field(default_factory=dict)
    units: memory.Units | None = None  # FSDP2 units of what this run holds (None: the whole policy's)


@dataclass
class Plan:
    """Everything `sensorvla plan` prints (see `format_plan`)."""

    vl_model: str
    family: str
    device: str
    backbone_dtype: str
    finetune: str
    stage: str
    checkpointing: bool
    batch: int
    grad_accum: int
    shapes: Shapes
    image_hw: tuple[int, int]
    groups: list[memory.GroupRow]
    num_samples: int
    cache_bytes: int | None
    scenarios: list[Scenario]
    gpus: tuple[int, ...]
    notes: list[str]


def backbone_dtype(cfg: SensorVLAConfig, device: str) -> torch.dtype:
    """The dtype the trainer loads the backbone in on `device` (training/loop.py + models/backbone.resolve_dtype),
    assuming a bf16-capable GPU for `cuda`."""
    name = cfg.model.backbone.dtype
    if name == "auto":
        if cfg.model.finetune.mode == "full":
            return torch.float32
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def _meta_vl(cfg: SensorVLAConfig, dtype: torch.dtype, notes: list[str]):
    """The HF model on the meta device: `random:` ids and hub ids we ship a config for need no files."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from sensorvla.models import random_vl
    from sensorvla.models.backbone import BackboneLoadError, _hint

    bb = cfg.model.backbone
    name = bb.vl_model
    if random_vl.is_random(name):
        config = random_vl.hf_config(name)
    else:
        try:
            config = AutoConfig.from_pretrained(name, revision=bb.revision)
        except (OSError, ValueError) as e:
            if not random_vl.has_arch(name):
                raise BackboneLoadError(_hint(name) + f" ({e}); or plan with --vl-model random:<hub id>") from e
            notes.append(f"{name} has no local copy: planned from its shipped config (random:{name})")
            config = random_vl.hf_config(name)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=bb.attn_implementation)


def _processor(cfg: SensorVLAConfig):
    from sensorvla.models import backbones, random_vl
    from sensorvla.models.backbone import BackboneLoadError, load_processor

    bb = cfg.model.backbone
    try:
        proc = load_processor(bb.vl_model, min_pixels=bb.min_pixels, max_pixels=bb.max_pixels, revision=bb.revision)
    except BackboneLoadError:
        if not random_vl.has_arch(bb.vl_model):
            raise
        return random_vl.random_processor(bb.vl_model, min_pixels=bb.min_pixels, max_pixels=bb.max_pixels)
    family = backbones.family_of_processor(proc)
    if not family.plannable:
        plannable = [t for f in backbones.ADAPTERS if f.plannable for t in f.model_types]
        raise BackboneLoadError(
            f"{bb.vl_model!r} is a {family.name} model: the memory planner models the blocks of {plannable} only "
            "(plan/activations.py); measure a real run's memory instead"
        )
    return proc


def resolve(
    cfg: SensorVLAConfig,
    *,
    views: int | None,
    image_size: tuple[int, int] | None,
    action_dim: int | None,
    sensor_channels: int | None,
    samples: int | None,
    notes: list[str],
):
    """Fill the dataset-derived fields: from --data.dataset-dir when given, else from the flags / defaults."""
    cfg = copy.deepcopy(cfg)
    if cfg.data.dataset_dir:
        from sensorvla.config import resolve_from_meta
        from sensorvla.data.format import load_meta
        from sensorvla.training.data_setup import raw_dataset

        meta = load_meta(cfg.data.dataset_dir, sensor_keys=cfg.data.sensor_keys)
        cfg = resolve_from_meta(cfg, meta)
        hw = tuple(int(x) for x in meta.image_shape[:2])
        if samples:
            n = samples
        else:  # cache rows: samples that share a camera frame set share one (feature_cache)
            ds = raw_dataset(cfg, "all", load_images=False)
            n = len({ds.vl_key(i) for i in range(len(ds))})
        n_val = len(raw_dataset(cfg, "val", load_images=False)) if cfg.data.val_fraction > 0 else 0
        instruction = meta.episodes[0].get("instruction", DEFAULT_INSTRUCTION) if meta.episodes else DEFAULT_INSTRUCTION
        return cfg, image_size or hw, n, n_val, instruction
    d = NO_DATASET_DEFAULTS
    m = cfg.model
    given = {}
    m.num_views = views or m.num_views or d["views"]
    m.head.horizon = m.head.horizon or cfg.data.horizon
    m.head.action_dim = action_dim or m.head.action_dim or d["action_dim"]
    if m.sensor.enabled:
        m.sensor.channels = sensor_channels or m.sensor.channels or d["sensor_channels"]
    given.update(views=m.num_views, action_dim=m.head.action_dim, sensor_channels=m.sensor.channels)
    hw = image_size or d["image_size"]
    notes.append(
        "no --data.dataset-dir: shapes from flags/defaults "
        + ", ".join(f"{k}={v}" for k, v in given.items())
        + f", image {hw[0]}x{hw[1]}, {samples or d['samples']} samples"
    )
    n = samples or d["samples"]
    return cfg, hw, n, int(n * cfg.data.val_fraction), DEFAULT_INSTRUCTION


def cast_meta_adapters(model: torch.nn.Module) -> None:
    """PEFT casts new LoRA adapters to their base layer's dtype, but skips adapters on the meta device
    (`_move_adapter_to_device_of_base_layer`); do that cast here so the meta model has the real dtypes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            dtype = m.get_base_layer().weight.dtype
            for name in m.adapter_layer_names:
                getattr(m, name).to(dtype=dtype)


def _set_checkpointing(policy, on: bool) -> None:
    base = policy.backbone.model
    if on:
        policy.backbone.enable_activation_checkpointing()
    else:
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()


def _batch_bytes(shapes: Shapes, cached: bool, n_feat: int, hidden: int) -> int:
    """The collated micro-batch (fp32 pixel values, token ids, sensor window, actions; or the cached VL features
    as float32): alive for the whole step."""
    b = shapes.batch
    common = b * (shapes.sensor_samples * max(shapes.sensor_channels, 1) * 4 + shapes.sensor_samples + 1)
    common += b * (shapes.horizon * shapes.action_dim * 4 + shapes.horizon + shapes.state_dim * 4 + 8)
    if cached:  # features as float32 (the trainer casts them), masks, float32 positions
        return common + b * n_feat * (hidden * 4 + 1 + 3 * 4)
    pixels = b * shapes.patches_per_sample * shapes.pixel_dim * 4
    return common + pixels + 3 * b * shapes.seq_len * 8 + b * shapes.num_views * 3 * 8


def _meta_policy(cfg: SensorVLAConfig, dtype: torch.dtype, notes: list[str]):
    """The policy as `build_policy` builds it, on the meta device, in the trainer's train / eval modes."""
    from sensorvla.data.timeline import SensorWindow
    from sensorvla.models import finetune
    from sensorvla.models.policy import VLAPolicy

    vl = _meta_vl(cfg, dtype, notes)
    with torch.device("meta"):
        policy = VLAPolicy(cfg.model, vl, SensorWindow.from_config(cfg.data))
        finetune.apply_finetune(policy, cfg.model.finetune)
    cast_meta_adapters(policy)
    policy.train()
    if cfg.model.finetune.mode == "none":
        policy.backbone.model.eval()
    return policy


def _activation_runs(policy, shapes: Shapes, device: str, dtype: torch.dtype, checkpointing: bool) -> dict:
    """{checkpointing off / on: (activation blocks of one step, bytes shared across blocks)}."""
    trainable_vl = any(p.requires_grad for p in policy.backbone.model.parameters())
    runs = {}
    for on in (False, True):
        _set_checkpointing(policy, on)
        blocks, shared = vl_blocks(policy, shapes, device)
        blocks.append(tail_block(policy, shapes, device, vl_dtype=dtype, vl_grad=trainable_vl))
        runs[on] = (blocks, shared)
    _set_checkpointing(policy, checkpointing)
    return runs


@dataclass
class _StepSettings:
    """What every scenario of one plan shares: checkpointing, accumulation, validation, optimizer temporaries."""

    checkpointing: bool
    accumulate: bool
    validation: bool
    opt_tmp: int


def _scenario(step: _StepSettings, name: str, runs: dict, extra: int, batch: int, states) -> Scenario:
    """A scenario from its activation runs (`_activation_runs`); `extra`: bytes on top (the batch itself)."""
    peaks = {on: step_peak(runs[on][0], grads_persist=step.accumulate) for on in runs}
    ckpt = step.checkpointing if step.checkpointing in runs else False
    chosen = peaks[ckpt]
    dyn = memory.Dynamic(
        act=chosen.peak - chosen.grads + runs[ckpt][1] + extra,
        act_grads=chosen.grads,
        opt_tmp=step.opt_tmp,
        batch=batch,
        accumulate=step.accumulate,
        validation=step.validation,
    )
    acts = {on: pk.peak - pk.grads + runs[on][1] + extra for on, pk in peaks.items()}
    return Scenario(
        name=name,
        states=states,
        dynamic=dyn,
        act_saved=chosen.saved,
        act_peak_off=acts[False],
        act_peak_on=acts.get(True, acts[False]),
        blocks=runs[ckpt][0],
    )


def _cached_scenario(cfg, policy, shapes: Shapes, device: str, dtype, step: _StepSettings, st, n_feat: int):
    """The stage-1 run from the VL cache, or None when this config cannot be cached (a note says why)."""
    from sensorvla.training.feature_cache import StaleCacheError, check_cacheable

    try:
        check_cacheable(cfg)
    except StaleCacheError as e:
        return None, (f"no VL cache for this config: {e}" if cfg.train.stage == "stage1" else None)
    hidden = policy.backbone.hidden_size
    tail = tail_block(policy, shapes, device, vl_dtype=torch.float32, vl_grad=False)
    cbatch = _batch_bytes(shapes, True, n_feat, hidden)
    cst = st
    if not CACHED_STAGE1_LOADS_BACKBONE:
        cst = memory.states(policy)
        vl_bytes = sum(memory.tensor_bytes(p) for p in policy.backbone.model.parameters())
        cst.weights[memory.dtype_name(dtype)] -= vl_bytes
    sc = _scenario(step, f"{cfg.train.stage} none cached", {False: ([tail], 0)}, cbatch, cbatch, cst)
    if not CACHED_STAGE1_LOADS_BACKBONE:
        sc.units = memory.fsdp_units(policy, without=policy.backbone.model)
    return sc, None


def _closing_notes(cfg, policy, scenarios, gpus, units, cached: bool, impl: str, opt_tmp: int) -> list[str]:
    """The notes printed under the plan: the backbone a cached stage 1 still loads, FSDP2 units, AdamW."""
    notes = []
    if cached and CACHED_STAGE1_LOADS_BACKBONE:
        vl_bytes = sum(memory.tensor_bytes(p) for p in policy.backbone.model.parameters())
        one = scenarios[-1].per_gpu["ddp"][gpus[0]] - vl_bytes
        notes.append(
            f"the cached stage 1 counts the backbone weights the trainer loads today; without that load it needs "
            f"{human(one)} on {gpus[0]} GPU(s)"
        )
    if cfg.train.strategy == "fsdp" or max(gpus) > 1:
        notes.append(
            f"FSDP2 shards {units.count} decoder layers as units; the rest (vision tower, embeddings, sensor "
            "encoder, fusion, head) is the root unit"
        )
    notes.append(f"optimizer: AdamW ({impl} step temporaries {opt_tmp / 2**20:.1f} MiB)")
    return notes


def plan(
    cfg: SensorVLAConfig,
    *,
    device: str = "cuda",
    gpus: tuple[int, ...] = (1, 2, 4, 8),
    views: int | None = None,
    image_size: tuple[int, int] | None = None,
    action_dim: int | None = None,
    sensor_channels: int | None = None,
    samples: int | None = None,
    optimizer_impl: str = "auto",
) -> Plan:
    """Plan memory for `cfg` on `device` ("cuda" or "cpu") without materializing any weight."""
    from sensorvla.config import resolve_stage_defaults
    from sensorvla.training.param_groups import build_param_groups
    from sensorvla.training.param_groups import optimizer_impl as resolve_impl

    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device {device!r}: plan for cuda or cpu")
    cfg = resolve_stage_defaults(copy.deepcopy(cfg))  # finetune mode "auto": the stage decides, as in validate()
    notes: list[str] = []
    shape_flags = dict(views=views, image_size=image_size, action_dim=action_dim, sensor_channels=sensor_channels)
    cfg, image_hw, n_samples, n_val, instruction = resolve(cfg, samples=samples, notes=notes, **shape_flags)
    m = cfg.model
    dtype = backbone_dtype(cfg, device)
    shapes = sample_shapes(cfg, _processor(cfg), image_hw, instruction)
    policy = _meta_policy(cfg, dtype, notes)
    requested = optimizer_impl if optimizer_impl != "auto" else cfg.train.optimizer_impl
    impl = resolve_impl(requested, sharded=cfg.train.strategy == "fsdp")  # what the trainer will build
    opt_groups = [g["params"] for g in build_param_groups(policy, cfg.train)]
    st = memory.states(policy)
    opt_tmp = memory.optimizer_transient(policy, opt_groups, impl)
    units = memory.fsdp_units(policy)
    hidden = policy.backbone.hidden_size
    bb = m.backbone
    n_feat = vl_token_count(bb.pooling, shapes, grid_size=bb.grid_size, num_queries=bb.num_queries)
    runs = _activation_runs(policy, shapes, device, dtype, bb.activation_checkpointing)
    step = _StepSettings(bb.activation_checkpointing, cfg.train.grad_accum_steps > 1, n_val > 0, opt_tmp)

    batch = _batch_bytes(shapes, False, n_feat, hidden)
    name = f"{cfg.train.stage} {m.finetune.mode}" + (" uncached" if m.finetune.mode == "none" else "")
    scenarios = [_scenario(step, name, runs, batch, batch, st)]
    cached, why_not = _cached_scenario(cfg, policy, shapes, device, dtype, step, st, n_feat)
    notes += [why_not] if why_not else []
    if cached is not None:
        scenarios.append(cached)
    for sc in scenarios:
        sc.per_gpu = {
            s: {n: memory.per_gpu_peak(sc.states, sc.units or units, sc.dynamic, s, n) for n in gpus}
            for s in ("ddp", "fsdp")
        }
    notes += _closing_notes(cfg, policy, scenarios, gpus, units, cached is not None, impl, opt_tmp)
    return Plan(
        vl_model=m.backbone.vl_model,
        family=policy.backbone.model.config.model_type,
        device=device,
        backbone_dtype=memory.dtype_name(dtype),
        finetune=m.finetune.mode,
        stage=cfg.train.stage,
        checkpointing=bb.activation_checkpointing,
        batch=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum_steps,
        shapes=shapes,
        image_hw=tuple(image_hw),
        groups=memory.group_rows(policy),
        num_samples=n_samples,
        cache_bytes=memory.cache_bytes(n_samples, n_feat, hidden, cfg.train.cache_dtype) if cached else None,
        scenarios=scenarios,
        gpus=tuple(gpus),
        notes=notes,
    )


def human(n: float) -> str:
    """Bytes as KiB / MiB / GiB."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def count(n: int) -> str:
    """A count as K / M / B."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _table(rows: list[tuple], header: tuple) -> list[str]:
    return ["  " + x for x in aligned_table([header, *rows])]


def format_plan(p: Plan) -> str:
    """The printed report."""
    s = p.shapes
    img_tokens = sum(t * h * w for t, h, w in s.grid_thw) // 4
    out = [
        f"sensorvla plan: {p.vl_model} ({p.family}) for {p.device}, backbone {p.backbone_dtype}, "
        f"{p.stage}, finetune {p.finetune}, activation checkpointing {'on' if p.checkpointing else 'off'}",
        f"micro-batch {p.batch} x grad-accum {p.grad_accum} per GPU (global batch {p.batch * p.grad_accum} x GPUs); "
        f"{s.num_views} view(s) {p.image_hw[0]}x{p.image_hw[1]} -> {s.seq_len} tokens/sample "
        f"({img_tokens} image), {s.patches_per_sample} vision patches/sample",
        "",
        "parameters per group",
    ]
    rows = [(g.group, count(g.params), count(g.trainable)) for g in p.groups]
    rows.append(("total", count(sum(g.params for g in p.groups)), count(sum(g.trainable for g in p.groups))))
    out += _table(rows, ("group", "params", "trainable"))
    st = p.scenarios[0].states

    def by_dtype(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {human(v)}" for k, v in sorted(d.items())) or "none"

    out += [
        "",
        "training state",
        f"  weights    {by_dtype(st.weights)}",
        f"  gradients  {by_dtype(st.grads)}",
        f"  AdamW      {by_dtype(st.optimizer)}",
        "",
        "activations per micro-batch (peak incl. the batch)",
    ]
    rows = [(sc.name, human(sc.act_peak_off), human(sc.act_peak_on), human(sc.dynamic.batch)) for sc in p.scenarios]
    out += _table(rows, ("scenario", "no checkpointing", "checkpointing", "of which batch"))
    top = sorted(p.scenarios[0].blocks, key=lambda b: -b.count * b.cost.retained)[:4]
    if top and top[0].cost.retained:
        out.append(
            "  saved for backward: "
            + ", ".join(f"{b.name} {b.count} x {human(b.cost.retained)}" for b in top if b.cost.retained)
        )
    out.append("")
    if p.cache_bytes is not None:
        out.append(f"VL cache on disk: {p.num_samples} distinct inputs -> {human(p.cache_bytes)}")
    else:
        out.append("VL cache: not used by this config")
    out += [
        "",
        "peak memory per GPU (allocated tensors, as torch.cuda.max_memory_allocated; the CUDA context and "
        "allocator slack come on top)",
    ]
    rows = []
    for sc in p.scenarios:
        for n in p.gpus:
            fsdp = human(sc.per_gpu["fsdp"][n]) if n > 1 else "-"
            rows.append((sc.name if n == p.gpus[0] else "", n, human(sc.per_gpu["ddp"][n]), fsdp))
    out += _table(rows, ("scenario", "GPUs", "DDP", "FSDP2"))
    if p.notes:
        out += ["", "notes:"] + [f"  - {n}" for n in p.notes]
    return "\n".join(out)


def plan_to_dict(p: Plan) -> dict:
    """JSON-ready form (bytes as integers)."""
    d = dataclasses.asdict(p)
    for sc in d["scenarios"]:
        sc["blocks"] = [{"name": b["name"], "count": b["count"], **b["cost"]} for b in sc["blocks"]]
        sc["per_gpu"] = {k: {str(n): v for n, v in vals.items()} for k, vals in sc["per_gpu"].items()}
    return d


def write_json(p: Plan, path: str | Path) -> Path:
    """Write the plan as JSON to `path` atomically."""
    from sensorvla.io import atomic_write_json

    return atomic_write_json(path, plan_to_dict(p))
