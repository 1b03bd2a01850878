"""THE training loop: stage 1 and 2, every head, 1..N processes. Stage, head and topology are config.

`train(cfg)` reads top to bottom: setup -> data -> (optional) resume, checked against the saved run ->
epochs of accumulated, clipped, logged optimizer steps -> validation, early stopping and checkpoints ->
clean teardown. `--mode cache` builds the stage-1 VL feature cache instead (`training/feature_cache.py`).

Random streams: each rank seeds the global RNG once (seed + rank); validation draws its noise from its
own `torch.Generator` and never reseeds or forks a global (CPU or CUDA) generator.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sensorvla.config import (
    SensorVLAConfig,
    check_stage_groups,
    config_changes,
    derive_grad_accum,
    describe_changes,
    resolve_from_meta,
    stage_config,
    stage_warnings,
)
from sensorvla.data.timeline import SensorWindow
from sensorvla.io import atomic_write_bytes
from sensorvla.progress import Progress, use_progress_bar
from sensorvla.runtime import bf16_autocast, loader_workers
from sensorvla.training import checkpoint as ckpt
from sensorvla.training import feature_cache
from sensorvla.training.data_setup import (
    ShardedEpochSampler,
    build_normalizer,
    ensure_stats,
    log_token_grid,
    make_loader,
    pin_hub_ids,
    preload,
    raw_dataset,
    split_summary,
)
from sensorvla.training.distributed import (
    all_gather_objects,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    teardown,
    wrap_model,
)
from sensorvla.training.param_groups import build_optimizer, build_param_groups, group_lrs, group_table
from sensorvla.training.resume import apply_optimizer_settings, check_resume
from sensorvla.training.run_log import RunLogger

logger = logging.getLogger("sensorvla.train")


RUN_CONFIG_FILE = "train_config.json"  # the run's whole resolved config, written at its start
VAL_SEED = 12345  # validation noise: the same draws at every validation, from a private generator


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; the message names the checkpoint with finite weights from before it."""


def run_length(cfg: SensorVLAConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs the run passes through, optimizer steps it takes). `--train.max-steps N` is a budget the run meets
    exactly: N steps, over as many epochs as they need (the last one cut), whatever `--train.epochs` says;
    without it, `--train.epochs` whole epochs."""
    if cfg.train.max_steps:
        return math.ceil(cfg.train.max_steps / max(steps_per_epoch, 1)), cfg.train.max_steps
    return cfg.train.epochs, steps_per_epoch * cfg.train.epochs


def schedule_length(cfg: SensorVLAConfig, steps_per_epoch: int) -> int:
    """`--train.schedule-steps`, or what the run will do (`run_length`: max-steps when set, else the epochs)."""
    if cfg.train.schedule_steps:
        return cfg.train.schedule_steps
    return run_length(cfg, steps_per_epoch)[1]


def divergence_message(ckpt_dir: Path, loss: float, grad_norm: float, step: int) -> str:
    """Point at the checkpoint with finite weights from before the blow-up (`best`), verified; never `last`.
    Names only what exists: a run that diverges before its first save is told that nothing was saved."""
    best, last = ckpt_dir / ckpt.BEST_NAME, ckpt_dir / ckpt.LAST_NAME
    good = ckpt.finite_checkpoint(best) if best.exists() else None
    msg = f"loss became {loss} (grad norm {grad_norm}) at step {step}. "
    if good is not None:
        pm = ckpt_dir / "pretrained_model"
        msg += (
            f"The weights from before the blow-up are in {best} (epoch {good['epoch']}, val_loss "
            f"{good['val_loss']:.6g}; every tensor checked finite)" + (f" and {pm}" if pm.exists() else "") + ". "
        )
    elif last.exists():
        msg += "No checkpoint with finite weights was saved before the blow-up (no validation had finished). "
    else:
        msg += f"Nothing was saved in {ckpt_dir} before the blow-up (no validation or --train.save-every-steps). "
    if last.exists():
        msg += f"{last} holds the latest state, which may already hold diverged weights: do not --resume from it. "
    return msg + (
        "Train again with a lower --lr / --vl-lr (stage 2 can start from the best stage-1 file), and check the data "
        "for NaN (`sensorvla stats`)."
    )


def window_weight_sum(batches: list[dict], sensor_loss_weight: float) -> float:
    """Sum of per-sample loss weights (w for samples with sensor data, 1 otherwise) over one window."""
    return float(sum(float(torch.where(b["has_sensor"].bool(), sensor_loss_weight, 1.0).sum()) for b in batches))


def backward_window(
    model: torch.nn.Module,
    batches: Iterable[dict],
    *,
    sensor_loss_weight: float,
    info,
    prepare=lambda b: b,
    is_fsdp: bool = False,
    autocast=nullcontext,
    n_micro: int | None = None,
) -> tuple[float, dict[str, float], int]:
    """Forward + backward over one gradient-accumulation window (this rank's micro-batches, read lazily).

    Each micro-batch back-propagates its weighted loss SUM; once the window is done, the gradients are
    divided by the window's total sample weight over all ranks (times the world size: DDP/FSDP average
    gradients over ranks). So a sensor sample weighs exactly `sensor_loss_weight` times a sensor-less one
    in the step's gradient, whichever micro-batch or rank it is in (an all-sensor micro-batch too), and no
    micro-batch has to be held back to know the total. Returns (this rank's share of the window's
    weighted mean loss: the mean over ranks is the all-reduced sum / world size; metrics over the window:
    each `loss_<x>` the mean over the samples it covers (`n_<x>` of them, or the micro-batch's samples), so a
    subset absent from a micro-batch does not pull its mean towards 0, and each `n_<x>` summed; samples seen on
    this rank).
    """
    batches = list(batches) if n_micro is None else batches
    n = len(batches) if n_micro is None else n_micro
    local_sum, local_weight, n_samples, sums, counts = 0.0, 0.0, 0, {}, {}
    for i, raw in enumerate(batches):
        local_weight += window_weight_sum([raw], sensor_loss_weight)
        batch = prepare(raw)
        sync = i == n - 1 or not info.enabled
        if is_fsdp:
            model.set_requires_gradient_sync(sync)
        no_sync = nullcontext() if sync or is_fsdp or not info.enabled else model.no_sync()
        with no_sync, autocast():
            loss, m = model(batch, sensor_loss_weight=sensor_loss_weight, weight_sum=1.0)  # the weighted sum
            loss.backward()
        local_sum += float(loss.detach())
        size = batch["actions"].shape[0]
        n_samples += size
        for k, v in m.items():  # n_<x> adds up; loss_<x> is weighted by the samples it is the mean over
            w = 1.0 if k.startswith("n_") else m.get(f"n_{k.removeprefix('loss_')}", size)
            sums[k], counts[k] = sums.get(k, 0.0) + v * w, counts.get(k, 0.0) + w
    total_weight = max(all_reduce_sum([local_weight], info)[0], 1e-8)
    scale = info.world_size / total_weight
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and scale != 1.0:  # one foreach call (x1.0 is the identity: skipped); the same products as a loop
        with torch.no_grad():
            torch._foreach_mul_(grads, scale)
    metrics = {k: v if k.startswith("n_") else v / counts[k] for k, v in sums.items()}
    return local_sum * scale, metrics, n_samples


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float):
    """LR factor per optimizer step: linear warmup over `warmup_ratio`, then cosine to `min_ratio`."""
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def autocast_ctx(cfg: SensorVLAConfig, device: torch.device):
    """bf16 autocast on CUDA with bf16 support under --train.mixed-precision; fp32 elsewhere."""
    return bf16_autocast(device) if cfg.train.mixed_precision else nullcontext()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def train(cfg: SensorVLAConfig, progress: bool = True, reference: SensorVLAConfig | None = None) -> dict:
    """Run `sensorvla train` with a resolved config. Returns a summary dict (rank 0 values).

    The start of the run logs only the values that differ from `reference` (the command's preset or
    defaults; None: `SensorVLAConfig()`), and `<output_dir>/train_config.json` holds the whole resolved config.

    Args:
        progress: False never shows a progress bar (plain log lines only); True leaves it to
            `--train.progress` (auto: a bar on a terminal only). Without a bar, the libraries' own bars
            (transformers' "Loading weights") are off too, so a redirected log never gets `\r` lines.
    """
    bars = use_progress_bar(cfg.train.progress, progress) and os.environ.get("RANK", "0") == "0"
    with _library_progress_bars(bars):
        return _train(cfg, progress, reference)


@contextmanager
def _library_progress_bars(enabled: bool):
    """Turn transformers' progress bars off for the block when ours are off (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _mode(bar_on: bool, info) -> bool | str:
    """The `sensorvla.progress` mode of the run's other loops (stats, cache, preload): the training bar's
    choice on rank 0, silent elsewhere."""
    return "on" if bar_on else ("off" if info.is_main else False)


def _train(cfg: SensorVLAConfig, progress: bool, reference: SensorVLAConfig | None) -> dict:
    """The named steps: set-up, then epochs (each: optimizer steps, validation, checkpoints), then teardown."""
    if cfg.train.resume and cfg.train.mode == "train":
        _check_resumable(Path(cfg.train.output_dir))
    cfg, info, bar_on = _start(cfg, progress, reference)
    from sensorvla.data.format import load_meta

    cfg = pin_hub_ids(cfg)  # hub ids -> cached snapshot folders, their commits recorded in the run's config
    meta = load_meta(cfg.data.dataset_dir, sensor_keys=cfg.data.sensor_keys)
    cfg = resolve_from_meta(cfg, meta)
    stats = ensure_stats(cfg, info, _mode(bar_on, info))
    normalizer = build_normalizer(stats, cfg)
    if cfg.train.mode == "cache":
        return _build_cache(cfg, _build_policy(cfg, info), normalizer, info, meta, _mode(bar_on, info))
    run = _setup(cfg, info, meta, stats, normalizer, bar_on)
    try:
        while run.state["epoch"] < run.epochs and not run.stop:
            _run_epoch(run)
        _ensure_pretrained(run)
    finally:
        _close(run)
    run.summary.update(
        best_val=run.state["best_val"],
        steps=run.state["step"],
        checkpoint_dir=str(run.ckpt_dir),
        config=dataclasses.asdict(cfg),
    )
    return run.summary


# --- set-up ------------------------------------------------------------------------------------------
def _check_resumable(output_dir: Path) -> None:
    """`--resume` with nothing saved: say so and what to do (before the dataset is opened: a resumed command line
    often names no dataset, and "not a dataset" would send the user the wrong way)."""
    last = output_dir / "checkpoints" / ckpt.LAST_NAME
    if not (last / "training_state.json").exists():
        raise FileNotFoundError(
            f"--resume: there is no checkpoint to resume in {output_dir} ({last} does not exist: the run saved "
            "nothing yet; a run saves it at the end of every epoch and every --train.save-every-steps). Start the "
            "run without --resume (with --dataset-dir), or point --output-dir at the folder of the run to resume."
        )


FRESH_STATE = {"epoch": 0, "micro_in_epoch": 0, "step": 0, "best_val": math.inf, "bad_validations": 0}
FRESH_STATE["samples_seen"] = 0


@dataclass
class _Data:
    """One run's datasets, samplers, transforms and the VL cache (None: the backbone runs every step)."""

    train: Any
    val: Any
    cache: Any
    sampler: ShardedEpochSampler
    val_sampler: ShardedEpochSampler
    transform: Any = None
    val_transform: Any = None
    pad_id: int = 0


@dataclass
class _Run:
    """Everything the loop's steps share: config, topology, model, optimizer, data, counters and logs."""

    cfg: SensorVLAConfig
    info: Any
    data: _Data
    policy: torch.nn.Module
    model: torch.nn.Module | None
    optimizer: Any
    scheduler: Any
    stats: Any
    fingerprint: Any
    bar_on: bool
    micro_per_epoch: int
    run_steps: int
    val_batches: int
    epochs: int  # epochs the run passes through (`run_length`: --train.max-steps decides when set)
    run_log: Any = None  # a RunLogger, opened once the saved state is restored
    bar: Any = None
    state: dict = field(default_factory=lambda: dict(FRESH_STATE))
    summary: dict = field(default_factory=lambda: {"train_loss": [], "val_loss": []})
    stop: bool = False
    last_loss: float = math.nan
    t_start: float = 0.0
    step_start: int = 0

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.train.output_dir) / "checkpoints"

    @property
    def is_fsdp(self) -> bool:
        return self.cfg.train.strategy == "fsdp" and self.info.enabled


def _start(cfg: SensorVLAConfig, progress: bool, reference: SensorVLAConfig | None = None):
    """Validate a private copy of the config, join the process group, seed this rank, log what the config
    changes (against `reference`) and the stage warnings."""
    cfg = copy.deepcopy(cfg.validate())  # validate() applies the stage defaults to the caller's config
    info = init_distributed(cfg.train.device)
    _setup_logging(info.is_main)
    torch.manual_seed(cfg.train.seed + info.rank)
    if info.is_main:  # before the derived values (accumulation, dataset shapes): what the caller chose
        against = "the defaults" if reference is None else "the given reference (the command's preset or defaults)"
        logger.info(describe_changes(config_changes(cfg, reference), against))
    cfg.train.grad_accum_steps = derive_grad_accum(cfg.train, info.world_size)
    if info.is_main:
        for warning in stage_warnings(cfg):
            logger.warning(warning)
        from sensorvla.models.backbone import random_backbone_note

        if cfg.train.mode == "train" and (note := random_backbone_note(cfg)):
            logger.warning(note)
        t = cfg.train
        logger.info(
            "global batch %d = batch %d x accumulation %d x world size %d%s",
            t.batch_size * t.grad_accum_steps * info.world_size,
            t.batch_size,
            t.grad_accum_steps,
            info.world_size,
            " (accumulation derived from --train.global-batch-size)" if t.global_batch_size else "",
        )
    return cfg, info, use_progress_bar(cfg.train.progress, progress) and info.is_main


def _setup(cfg, info, meta, stats, normalizer, bar_on: bool) -> _Run:
    """Data, the saved run's check, model, transforms, optimizer (+ restored state), logs: a ready `_Run`."""
    data = _open_data(cfg, info, meta)
    micro_per_epoch = math.ceil(len(data.sampler) / cfg.train.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.train.grad_accum_steps)
    run_epochs, run_steps = run_length(cfg, steps_per_epoch)
    fingerprint = _fingerprint(cfg)
    _check_saved_run(cfg, info, steps_per_epoch, fingerprint)
    # every VL feature from the cache: the backbone's weights are never used, so they are not loaded
    policy = _build_policy(cfg, info, vl_weights=data.cache is None)
    stage1_init = None
    if stage_config(cfg).init_from == "stage1_checkpoint" and not cfg.train.resume:
        stage1_init = ckpt.load_stage1_into(policy, cfg.train.stage1_checkpoint)
    _attach_transforms(cfg, data, normalizer, _mode(bar_on, info), info)
    model, groups, optimizer, scheduler = _optimization(cfg, policy, info)
    # FSDP2 forwards are collective: every rank runs as many validation batches as the largest shard
    shards = [len(data.val_sampler.indices(r)) for r in range(info.world_size)]
    val_batches = max(math.ceil(n / cfg.train.batch_size) for n in shards)
    run = _Run(
        cfg=cfg,
        info=info,
        data=data,
        policy=policy,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        stats=stats,
        fingerprint=fingerprint,
        bar_on=bar_on,
        micro_per_epoch=micro_per_epoch,
        run_steps=run_steps,
        val_batches=val_batches,
        epochs=run_epochs,
    )
    if cfg.train.resume:
        _restore(run)
    run.run_log = RunLogger(
        Path(cfg.train.output_dir),
        enabled=info.is_main,
        tensorboard=cfg.train.tensorboard,
        wandb=cfg.train.wandb,
        config=cfg.to_dict(),
    )
    if stage1_init is not None:
        run.run_log.log("stage1_init", 0, stage1_init)
    _announce(run, groups, steps_per_epoch, len(meta.episodes))
    desc = f"{cfg.train.stage} {cfg.model.head.type}"  # its plain lines are the loop's own (`_log_progress`)
    run.bar = Progress(total=run_steps, initial=run.state["step"], mode="on" if bar_on else False, desc=desc)
    run.t_start, run.step_start = time.perf_counter(), run.state["step"]
    return run


def _optimization(cfg: SensorVLAConfig, policy: torch.nn.Module, info):
    """(the wrapped model, the named param groups, AdamW, the warmup-cosine schedule)."""
    if cfg.runtime.compile:  # --runtime.compile: sensor encoder + head, in place (parameter names unchanged)
        from sensorvla.runtime import compile_policy

        compile_policy(policy, training=True)
    model = wrap_model(policy, info, cfg.train.strategy)  # before the optimizer: FSDP2 makes DTensors
    groups = build_param_groups(policy, cfg.train)
    check_stage_groups(cfg, [g["name"] for g in groups])
    optimizer = build_optimizer(groups, cfg.train, sharded=cfg.train.strategy == "fsdp" and info.enabled)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.train.schedule_steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)
    )
    return model, groups, optimizer, scheduler


def _open_data(cfg: SensorVLAConfig, info, meta) -> _Data:
    """The train/val splits and samplers; in stage 1 with a frozen backbone, the VL cache when there is one."""
    cache = None
    cacheable = stage_config(cfg).may_use_vl_cache and feature_cache.backbone_frozen(cfg)
    if cacheable and cfg.train.use_cache != "never":
        all_ids = raw_dataset(cfg, "all", load_images=False).sample_ids
        cache = feature_cache.open_cache(cfg, all_ids, meta.dataset_id, info.device)
        if cache is None and cfg.train.use_cache == "always":
            raise feature_cache.StaleCacheError(
                f"--train.use-cache always but no VL cache exists; build it: {feature_cache.rebuild_command(cfg)}"
            )
        if cache is not None:
            logger.info("stage 1 reads VL features from the cache %s", cache.folder)
            if cfg.data.augment.enabled:
                logger.warning(
                    "--data.augment.enabled: stage 1 reads VL features from the cache, which holds the "
                    "un-augmented images, so NO image augmentation is applied in this run. Use "
                    "--train.use-cache never to augment (the backbone then runs every step)."
                )
    # each split opened once, its images only when no cache replaces them
    train_raw, val_raw = (raw_dataset(cfg, split, load_images=cache is None) for split in ("train", "val"))
    sampler = ShardedEpochSampler(len(train_raw), seed=cfg.train.seed, rank=info.rank, world=info.world_size)
    # validation: an exact partition (no wrap-around padding), so every sample is counted once
    val_sampler = ShardedEpochSampler(
        len(val_raw),
        seed=0,
        rank=info.rank,
        world=info.world_size,
        shuffle=False,
        pad=False,
        limit=cfg.train.val_max_samples,
    )
    return _Data(train_raw, val_raw, cache, sampler, val_sampler)


def _fingerprint(cfg: SensorVLAConfig) -> list:
    """The content fingerprints of the dataset and every mixture dataset (JSON-normalised)."""
    from sensorvla.data.normalize import dataset_fingerprint

    paths = [cfg.data.dataset_dir] + _mixture_paths(cfg)
    return json.loads(json.dumps([dataset_fingerprint(p) for p in paths]))


def _check_saved_run(cfg: SensorVLAConfig, info, steps_per_epoch: int, fingerprint) -> None:
    """Set the LR schedule length; on `--resume`, refuse changes that reinterpret the saved run (logs the diff)."""
    out_dir, ckpt_dir = Path(cfg.train.output_dir), Path(cfg.train.output_dir) / "checkpoints"
    saved_cfg = saved_info = None
    if cfg.train.resume:
        saved_cfg, saved_info = ckpt.load_run_config(out_dir), ckpt.load_run_info(ckpt_dir) or {}
        if saved_cfg is not None and not cfg.train.schedule_steps:
            cfg.train.schedule_steps = saved_cfg.train.schedule_steps  # auto keeps the saved schedule
    cfg.train.schedule_steps = schedule_length(cfg, steps_per_epoch)
    if saved_cfg is not None:
        diff = check_resume(
            saved_cfg.to_dict(),
            cfg.to_dict(),
            saved_info.get("dataset_fingerprint"),
            fingerprint,
            where=str(ckpt_dir / ckpt.LAST_NAME),
        )
        if info.is_main:
            logger.info("resume: changes against the saved run:\n%s", "\n".join(diff) if diff else "  (none)")
    elif cfg.train.resume and info.is_main:
        logger.warning("resume: %s has no saved config (older sensorvla); changes cannot be checked", ckpt_dir)


def _build_policy(cfg: SensorVLAConfig, info, vl_weights: bool = True) -> torch.nn.Module:
    """The policy on this rank's device (fp32 for full fine-tuning with an `auto` backbone dtype); without the
    backbone's weights when `vl_weights` is False (stage 1 from the VL cache)."""
    from sensorvla.models.policy import build_policy

    dtype = torch.float32 if cfg.model.finetune.mode == "full" and cfg.model.backbone.dtype == "auto" else None
    if not vl_weights and info.is_main:
        logger.info("stage 1 from the VL cache: the backbone's weights are not loaded")
    window = SensorWindow.from_config(cfg.data)
    return build_policy(cfg.model, window, device=info.device, dtype=dtype, vl_weights=vl_weights)


def _attach_transforms(cfg: SensorVLAConfig, data: _Data, normalizer, progress: bool | str, info) -> None:
    """Sample transforms (the processor unless cached; augmentation in training only); preload when cached."""
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.processor import PolicyProcessor

    b = cfg.model.backbone
    processor = None
    if data.cache is None:
        processor = load_processor(b.vl_model, min_pixels=b.min_pixels, max_pixels=b.max_pixels, revision=b.revision)
        if info.is_main:
            log_token_grid(processor, cfg)
    augment = None
    if cfg.data.augment.enabled and processor is not None:
        from sensorvla.data.augment import ImageAugment

        augment = ImageAugment(cfg.data.augment, seed=cfg.train.seed)
    data.transform = PolicyProcessor(normalizer, processor, b.prompt_template, cfg.model.state_dim, augment=augment)
    # validation never augments: the same chain without the augmenter
    data.val_transform = PolicyProcessor(normalizer, processor, b.prompt_template, cfg.model.state_dim)
    data.pad_id = pad_token_id(processor) if processor is not None else 0
    if data.cache is not None:  # nothing random is left per sample: transform the non-image part once, in memory
        data.train = preload(data.train, data.transform, cfg.train.preload_max_gb, progress)
        data.val = preload(data.val, data.val_transform, cfg.train.preload_max_gb, progress)


def _restore(run: _Run) -> None:
    """`--resume`: model, optimizer, scheduler, this rank's RNG and the loop position from `last/`."""
    cfg, info = run.cfg, run.info
    payload, saved_state, rng = ckpt.load_last(run.ckpt_dir)
    if run.is_fsdp:  # the saved states are full (gathered); each rank keeps its shard of them
        ckpt.load_sharded_payload(run.policy, run.optimizer, payload, run.ckpt_dir / ckpt.LAST_NAME)
    else:
        ckpt.load_model_payload(run.policy, payload, run.ckpt_dir / ckpt.LAST_NAME)
        run.optimizer.load_state_dict(payload["optimizer_state_dict"])
    run.scheduler.load_state_dict(payload["scheduler_state_dict"])
    notes = apply_optimizer_settings(run.optimizer, run.scheduler, group_lrs(cfg.train), cfg.train.weight_decay)
    if notes and info.is_main:
        logger.warning("resume: the command line's optimizer settings replace the saved ones: %s", "; ".join(notes))
    if len(rng) != info.world_size:
        raise RuntimeError(
            f"--resume: the run was saved with {len(rng)} processes; resume with the same "
            f"--nproc_per_node (got {info.world_size})"
        )
    ckpt.restore_rng(rng[info.rank])
    run.state.update(saved_state)
    logger.info("resumed at epoch %d, step %d", run.state["epoch"], run.state["step"])


def _announce(run: _Run, groups: list[dict], steps_per_epoch: int, n_episodes: int) -> None:
    """Rank 0 logs the resolved config, the parameter groups and the data; stage 2 keeps its stage-1 input."""
    cfg, info = run.cfg, run.info
    if not info.is_main:
        return
    path = Path(cfg.train.output_dir) / RUN_CONFIG_FILE
    atomic_write_bytes(path, (cfg.to_json() + "\n").encode())
    logger.info("the whole resolved config: %s", path)
    logger.info("parameter groups:\n%s", group_table(run.policy, groups))
    logger.info(
        "dataset: %s | train samples %d, val samples %d%s | world size %d | %d steps/epoch | LR schedule over %d steps",
        run.data.train.summary(),
        len(run.data.train),
        len(run.data.val),
        f" (validating on {run.data.val_sampler.n}, --train.val-max-samples)" if cfg.train.val_max_samples else "",
        info.world_size,
        steps_per_epoch,
        cfg.train.schedule_steps,
    )
    for line in split_summary(cfg, n_episodes):
        logger.info("%s", line)
    if cfg.train.max_steps:
        logger.info(
            "run: exactly %d optimizer steps (--train.max-steps) over %d epoch(s) of %d steps%s",
            run.run_steps,
            run.epochs,
            steps_per_epoch,
            f" (--train.epochs {cfg.train.epochs} overridden)" if run.epochs != cfg.train.epochs else "",
        )
    if stage_config(cfg).init_from == "stage1_checkpoint":
        names = [ckpt.BEST_NAME] + [ckpt.epoch_name(e) for e in range(1, run.epochs + 1)]
        ckpt.backup_if_overwritten(run.ckpt_dir, cfg.train.stage1_checkpoint, names)


# --- epoch -------------------------------------------------------------------------------------------
def _run_epoch(run: _Run) -> None:
    """Optimizer steps to the end of the epoch (or --max-steps), then validation and checkpoints."""
    cfg, state, data = run.cfg, run.state, run.data
    epoch = state["epoch"]
    data.train.set_epoch(epoch)  # reseeds VL-staleness draws / the mixture plan
    data.sampler.set_position(epoch, state["micro_in_epoch"] * cfg.train.batch_size)
    run.policy.train()
    if feature_cache.backbone_frozen(cfg) and run.policy.backbone.has_weights:
        run.policy.backbone.model.eval()
    loader = iter(make_loader(data.train, data.transform, data.sampler, cfg, data.pad_id))
    while state["micro_in_epoch"] < run.micro_per_epoch:
        _step(run, loader, epoch)
        if cfg.train.save_every_steps and state["step"] % cfg.train.save_every_steps == 0:
            _save_last(run)
        if cfg.train.max_steps and state["step"] >= cfg.train.max_steps:
            run.stop = True
            break
    epoch_done = state["micro_in_epoch"] >= run.micro_per_epoch
    if epoch_done:
        state["epoch"] += 1
        state["micro_in_epoch"] = 0
    due = state["epoch"] % cfg.train.val_every_epochs == 0 or state["epoch"] == run.epochs
    if run.stop or (epoch_done and due):
        _validate_and_checkpoint(run, epoch + 1)  # 1-based index of the epoch just run (complete or cut)
    if epoch_done or run.stop:
        _save_last(run)


# --- step --------------------------------------------------------------------------------------------
def _step(run: _Run, loader, epoch: int) -> None:
    """One optimizer step: an accumulation window of micro-batches, clipping, the divergence check, logs."""
    cfg, info, state = run.cfg, run.info, run.state
    t0, cpu0 = time.perf_counter(), time.process_time()
    n_micro = min(cfg.train.grad_accum_steps, run.micro_per_epoch - state["micro_in_epoch"])
    share, step_metrics, n_samples = backward_window(
        run.model,
        (next(loader) for _ in range(n_micro)),
        sensor_loss_weight=cfg.train.sensor_loss_weight,
        info=info,
        prepare=functools.partial(_prepare, cache=run.data.cache, device=info.device),
        is_fsdp=run.is_fsdp,
        autocast=functools.partial(autocast_ctx, cfg, info.device),
        n_micro=n_micro,
    )
    state["micro_in_epoch"] += n_micro
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.train.grad_clip, foreach=True)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    mean_loss = all_reduce_sum([share], info)[0] / info.world_size
    if not math.isfinite(mean_loss) or not torch.isfinite(grad_norm):
        raise TrainingDivergedError(divergence_message(run.ckpt_dir, mean_loss, float(grad_norm), state["step"] + 1))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    state["samples_seen"] += n_samples * info.world_size
    lrs = {f"lr/{g['name']}": g["lr"] for g in run.optimizer.param_groups if "no_decay" not in g["name"]}
    row = {
        "loss": mean_loss,
        "grad_norm": float(grad_norm),
        "epoch": epoch,
        "samples_per_s": n_samples * info.world_size / (time.perf_counter() - t0),
        # this rank's CPU-seconds per sample (its every thread; DataLoader worker processes are not counted)
        "cpu_s_per_sample": (time.process_time() - cpu0) / max(n_samples, 1),
        **lrs,
        **{k: v for k, v in step_metrics.items() if k.startswith("loss_")},
    }
    run.last_loss = mean_loss
    _log_step(run, row, epoch)


def _log_step(run: _Run, row: dict, epoch: int) -> None:
    """The step's metrics: every step's loss, the full row periodically; the bar or a plain line."""
    step, loss = run.state["step"], row["loss"]
    run.summary["train_loss"].append(loss)
    periodic = step % run.cfg.train.log_every_steps == 0 or step in (1, run.run_steps)
    run.run_log.log("train", step, row if periodic else {"loss": loss})
    run.bar.update(1)
    run.bar.set_postfix(
        loss=f"{loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.1e}", sps=f"{row['samples_per_s']:.1f}"
    )
    if periodic and not run.bar_on and run.info.is_main:
        _log_progress(step, run.run_steps, epoch, run.epochs, row, run.t_start, run.step_start)


# --- validate ----------------------------------------------------------------------------------------
def _validate(run: _Run) -> tuple[float, dict[str, float]]:
    """Mean validation loss over every rank's exact shard (noise from a private generator), and with the wrench
    output `val_loss_wrench` (its mean over samples with a measured target)."""
    cfg, info, data = run.cfg, run.info, run.data
    run.policy.eval()
    gen = torch.Generator(device=info.device).manual_seed(VAL_SEED)  # the global RNG is never touched
    totals, last, done = [0.0, 0.0, 0.0, 0.0], None, 0
    with torch.no_grad(), autocast_ctx(cfg, info.device):
        for batch in make_loader(data.val, data.val_transform, data.val_sampler, cfg, data.pad_id):
            last = _prepare(batch, data.cache, info.device)
            loss, m = run.policy(last, sensor_loss_weight=1.0, generator=gen)
            n = last["actions"].shape[0]
            totals[0] += float(loss) * n
            totals[1] += n
            totals[2] += m.get("loss_wrench", 0.0) * m.get("n_wrench", 0.0)
            totals[3] += m.get("n_wrench", 0.0)
            done += 1
        while run.is_fsdp and done < run.val_batches:  # lockstep filler, not counted
            if last is None:
                first = next(iter(make_loader(data.val, data.val_transform, [0], cfg, data.pad_id)))
                last = _prepare(first, data.cache, info.device)
            run.policy(last, sensor_loss_weight=1.0, generator=gen)
            done += 1
    s, n, w, n_w = all_reduce_sum(totals, info)
    return s / max(n, 1), ({"val_loss_wrench": w / n_w} if n_w else {})


# --- checkpoint --------------------------------------------------------------------------------------
def _validate_and_checkpoint(run: _Run, epoch_label: int) -> None:
    """Validate, track the best and early stopping, write the epoch / best seed files and `pretrained_model`."""
    cfg, state = run.cfg, run.state
    val, extra = _validate(run) if len(run.data.val) else (run.last_loss, {})
    run.summary["val_loss"].append(val)
    run.run_log.log("val", state["step"], {"val_loss": val, "epoch": epoch_label, **extra})
    logger.info("epoch %d step %d val_loss %.5f", epoch_label, state["step"], val)
    improved = val < state["best_val"]
    if improved:
        state["best_val"], state["bad_validations"] = val, 0
    else:
        state["bad_validations"] += 1
    payload, full = _payload(run, epoch=epoch_label, val_loss=val)
    if run.info.is_main:
        if cfg.model.head.type == "diffusion":
            ckpt.save_seed_file(run.ckpt_dir / ckpt.epoch_name(epoch_label), payload)
        if improved:
            ckpt.save_seed_file(run.ckpt_dir / ckpt.BEST_NAME, payload)
            _save_pretrained(run, full)
    if cfg.train.patience and state["bad_validations"] >= cfg.train.patience:
        logger.info("early stopping: no improvement in %d validations", cfg.train.patience)
        run.stop = True


def _gathered(run: _Run) -> tuple[dict | None, dict | None]:
    """Full model/optimizer states on every rank for FSDP2 (collective); None for DDP / 1 process."""
    if not run.is_fsdp:
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(run.policy, options=opts), get_optimizer_state_dict(
        run.policy, run.optimizer, options=opts
    )


def _payload(run: _Run, *, epoch: int, val_loss: float) -> tuple[dict | None, dict | None]:
    """(the seed checkpoint dict on rank 0 / None elsewhere, the gathered model state). Collective."""
    full, opt_full = _gathered(run)
    if not run.info.is_main:
        return None, full
    payload = ckpt.seed_payload(
        run.policy,
        run.optimizer,
        run.scheduler,
        epoch=epoch,
        val_loss=val_loss,
        stage=run.cfg.train.stage,
        state=full,
        optimizer_state=opt_full,
    )
    return payload, full


def _save_last(run: _Run) -> None:
    """Replace `last/` (every rank's RNG, the seed payload, the loop position, the config). Collective."""
    rngs = all_gather_objects(ckpt.rng_state(), run.info)
    payload, _ = _payload(run, epoch=run.state["epoch"], val_loss=run.state["best_val"])
    if run.info.is_main:
        run_info = {
            "dataset_fingerprint": run.fingerprint,
            "schedule_steps": run.cfg.train.schedule_steps,
            "world_size": run.info.world_size,
        }
        cfg_json = run.cfg.to_json()
        ckpt.save_last(run.ckpt_dir, payload, dict(run.state), rngs, config_json=cfg_json, run_info=run_info)


def _save_pretrained(run: _Run, full: dict | None) -> None:
    from sensorvla.models.folder import save_pretrained

    with ckpt.write_errors(run.ckpt_dir / "pretrained_model"):
        save_pretrained(run.policy, run.ckpt_dir / "pretrained_model", run.cfg, run.stats, state=full)


def _ensure_pretrained(run: _Run) -> None:
    """A run that never improved still leaves a `pretrained_model/` (decided on rank 0, broadcast)."""
    # a per-rank file check could split ranks, and _gathered() is collective
    if not broadcast_object((run.ckpt_dir / "pretrained_model").exists(), run.info):
        full, _ = _gathered(run)
        if run.info.is_main:
            _save_pretrained(run, full)


def _close(run: _Run) -> None:
    """Close the bar and logs, drop the DDP / optimizer references, then tear the process group down."""
    if run.bar is not None:
        run.bar.close()
    if run.run_log is not None:
        run.run_log.close()
    run.model = run.optimizer = run.scheduler = None  # drop DDP + optimizer refs before teardown
    teardown(run.info)


def _mixture_paths(cfg: SensorVLAConfig) -> list[str]:
    from sensorvla.config import parse_mixture

    return [parse_mixture(spec)[0] for spec in cfg.data.mixture]


def _log_progress(step: int, total: int, epoch: int, epochs: int, row: dict, t_start: float, step_start: int) -> None:
    """One plain progress line (no `\\r`): for logs that are not a terminal, and `--train.progress off`."""
    elapsed = time.perf_counter() - t_start
    done = step - step_start
    eta = elapsed / done * (total - step) if done else float("nan")
    lr = next((v for k, v in row.items() if k.startswith("lr/")), float("nan"))
    logger.info(
        "step %d/%d | epoch %d/%d | loss %.4f | lr %.2e | %.1f samples/s | elapsed %.0fs | eta %.0fs",
        step,
        total,
        epoch + 1,
        epochs,
        row["loss"],
        lr,
        row["samples_per_s"],
        elapsed,
        eta,
    )


def _prepare(batch: dict, cache, device: torch.device) -> dict:
    if cache is not None:
        feats, mask, pos = cache.lookup(batch["sample_id"])
        batch["vl_features"], batch["vl_mask"], batch["vl_pos"] = feats.float(), mask, pos
    return _to(batch, device)


def _build_cache(cfg, policy, normalizer, info, meta, progress) -> dict:
    """`--mode cache`: encode every sample of the dataset (all splits) once with the frozen backbone."""
    from sensorvla.data.transforms import TransformedDataset
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.processor import PolicyProcessor, collate

    feature_cache.check_cacheable(cfg)
    ds, b = raw_dataset(cfg, "all"), cfg.model.backbone
    processor = load_processor(b.vl_model, min_pixels=b.min_pixels, max_pixels=b.max_pixels, revision=b.revision)
    if info.is_main:
        log_token_grid(processor, cfg)
    tds = TransformedDataset(ds, PolicyProcessor(normalizer, processor, b.prompt_template, cfg.model.state_dim))
    pad = pad_token_id(processor)

    def loader_factory(positions, start):
        subset = torch.utils.data.Subset(tds, positions[start:])
        return torch.utils.data.DataLoader(
            subset,
            batch_size=cfg.train.batch_size,
            num_workers=loader_workers(cfg.data.num_workers, in_memory=False),
            collate_fn=functools.partial(collate, pad_token_id=pad),
        )

    try:
        folder = feature_cache.build_cache(
            cfg,
            policy,
            loader_factory,
            ds.sample_ids,
            meta.dataset_id,
            info,
            progress=progress,
            vl_keys=[ds.vl_key(i) for i in range(len(ds))],
        )
    finally:
        teardown(info)
    logger.info("VL cache ready in %s", folder)
    return {"cache_dir": str(folder)}
