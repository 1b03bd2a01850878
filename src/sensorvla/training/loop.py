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
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from sensorvla.config import SensorVLAConfig, stage_warnings
from sensorvla.training import checkpoint as ckpt
from sensorvla.training import feature_cache
from sensorvla.training.data_setup import (
    ShardedEpochSampler,
    build_normalizer,
    ensure_stats,
    make_loader,
    preload,
    raw_dataset,
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


VAL_SEED = 12345  # validation noise: the same draws at every validation, from a private generator


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; the message names the checkpoint with finite weights from before it."""


def schedule_length(cfg: SensorVLAConfig, steps_per_epoch: int) -> int:
    """`--train.schedule-steps`, or what the run will do: min(epochs * steps/epoch, max_steps)."""
    if cfg.train.schedule_steps:
        return cfg.train.schedule_steps
    total = steps_per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def use_progress_bar(setting: str, allowed: bool = True) -> bool:
    """`--train.progress`: on = a bar, off = plain log lines, auto = a bar only when stdout and stderr are
    terminals (a redirected log gets plain lines, never `\r` bars)."""
    if not allowed or setting == "off":
        return False
    return setting == "on" or (sys.stdout.isatty() and sys.stderr.isatty())


def divergence_message(ckpt_dir: Path, loss: float, grad_norm: float, step: int) -> str:
    """Point at the checkpoint with finite weights from before the blow-up (`best`), verified; never `last`."""
    best = ckpt_dir / ckpt.BEST_NAME
    good = ckpt.finite_checkpoint(best) if best.exists() else None
    msg = f"loss became {loss} (grad norm {grad_norm}) at step {step}. "
    if good is not None:
        pm = ckpt_dir / "pretrained_model"
        msg += (
            f"The weights from before the blow-up are in {best} (epoch {good['epoch']}, val_loss "
            f"{good['val_loss']:.6g}; every tensor checked finite)" + (f" and {pm}" if pm.exists() else "") + ". "
        )
    else:
        msg += "No checkpoint with finite weights was saved before the blow-up (no validation had finished). "
    return msg + (
        f"{ckpt_dir / ckpt.LAST_NAME} holds the latest state, which may already hold diverged weights: do not "
        "--resume from it. Train again with a lower --lr / --vl-lr (stage 2 can start from the best stage-1 "
        "file), and check the data for NaN (`sensorvla stats`)."
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
    weighted mean loss: the mean over ranks is the all-reduced sum / world size; metrics averaged over
    micro-batches; samples seen on this rank).
    """
    batches = list(batches) if n_micro is None else batches
    n = len(batches) if n_micro is None else n_micro
    local_sum, local_weight, n_samples, metrics = 0.0, 0.0, 0, {}
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
        n_samples += batch["actions"].shape[0]
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v / n
    total_weight = max(all_reduce_sum([local_weight], info)[0], 1e-8)
    scale = info.world_size / total_weight
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return local_sum * scale, metrics, n_samples


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def autocast_ctx(cfg: SensorVLAConfig, device: torch.device):
    """bf16 autocast on CUDA with bf16 support; fp32 elsewhere (CPU bf16 autocast is slower here)."""
    if cfg.train.mixed_precision and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def train(cfg: SensorVLAConfig, progress: bool = True) -> dict:
    """Run `sensorvla train` with a resolved config. Returns a summary dict (rank 0 values).

    Args:
        progress: False never shows a progress bar (plain log lines only); True leaves it to
            `--train.progress` (auto: a bar on a terminal only). Without a bar, the libraries' own bars
            (transformers' "Loading weights") are off too, so a redirected log never gets `\r` lines.
    """
    bars = use_progress_bar(cfg.train.progress, progress) and os.environ.get("RANK", "0") == "0"
    with _library_progress_bars(bars):
        return _train(cfg, progress)


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


def _train(cfg: SensorVLAConfig, progress: bool) -> dict:  # noqa: PLR0915 (flat by design)
    cfg = copy.deepcopy(cfg.validate())  # validate() applies the stage defaults to the caller's config
    info = init_distributed(cfg.train.device)
    _setup_logging(info.is_main)
    torch.manual_seed(cfg.train.seed + info.rank)
    if info.is_main:
        for warning in stage_warnings(cfg):
            logger.warning(warning)
    bar_on = use_progress_bar(cfg.train.progress, progress) and info.is_main

    from sensorvla.data.format import load_meta
    from sensorvla.data.normalize import dataset_fingerprint
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.pretrained import build_policy, resolve_from_meta, save_pretrained

    meta = load_meta(cfg.data.dataset_dir)
    cfg = resolve_from_meta(cfg, meta)
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    stats = ensure_stats(cfg, info, bar_on)
    normalizer = build_normalizer(stats, cfg)
    dtype = torch.float32 if cfg.model.finetune.mode == "full" and cfg.model.backbone.dtype == "auto" else None

    if cfg.train.mode == "cache":
        policy = build_policy(cfg, device=info.device, dtype=dtype)
        return _build_cache(cfg, policy, normalizer, info, meta, bar_on)

    # --- data -------------------------------------------------------------------------------------
    train_raw = raw_dataset(cfg, "train")
    val_raw = raw_dataset(cfg, "val")
    cache = None
    if cfg.train.stage == "stage1" and cfg.train.use_cache != "never" and feature_cache.backbone_frozen(cfg):
        all_ids = raw_dataset(cfg, "all", load_images=False).sample_ids
        cache = feature_cache.open_cache(cfg, all_ids, meta.dataset_id)
        if cache is None and cfg.train.use_cache == "always":
            raise feature_cache.StaleCacheError(
                f"--train.use-cache always but no VL cache exists; build it: {feature_cache.rebuild_command(cfg)}"
            )
        if cache is not None:
            train_raw = raw_dataset(cfg, "train", load_images=False)
            val_raw = raw_dataset(cfg, "val", load_images=False)
            logger.info("stage 1 reads VL features from the cache %s", cache.folder)
            if cfg.data.augment.enabled:
                logger.warning(
                    "--data.augment.enabled: stage 1 reads VL features from the cache, which holds the "
                    "un-augmented images, so NO image augmentation is applied in this run. Use "
                    "--train.use-cache never to augment (the backbone then runs every step)."
                )
    sampler = ShardedEpochSampler(len(train_raw), seed=cfg.train.seed, rank=info.rank, world=info.world_size)
    # validation: an exact partition (no wrap-around padding), so every sample is counted once
    val_sampler = ShardedEpochSampler(
        len(val_raw), seed=0, rank=info.rank, world=info.world_size, shuffle=False, pad=False
    )
    micro_per_epoch = math.ceil(len(sampler) / cfg.train.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.train.grad_accum_steps)
    run_steps = steps_per_epoch * cfg.train.epochs
    run_steps = min(run_steps, cfg.train.max_steps) if cfg.train.max_steps else run_steps
    fingerprint = json.loads(
        json.dumps([dataset_fingerprint(cfg.data.dataset_dir)] + [dataset_fingerprint(p) for p in _mixture_paths(cfg)])
    )

    # --- resume: the saved run's config decides what the saved position means ----------------------
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

    # --- model --------------------------------------------------------------------------------------
    policy = build_policy(cfg, device=info.device, dtype=dtype)
    stage1_init = None
    if cfg.train.stage == "stage2" and not cfg.train.resume:
        stage1_init = ckpt.load_stage1_into(policy, cfg.train.stage1_checkpoint)
    processor = (
        None
        if cache is not None
        else load_processor(
            cfg.model.backbone.vl_model,
            min_pixels=cfg.model.backbone.min_pixels,
            max_pixels=cfg.model.backbone.max_pixels,
            revision=cfg.model.backbone.revision,
        )
    )
    from sensorvla.models.processor import SampleTransform

    augment = None
    if cfg.data.augment.enabled and processor is not None:
        from sensorvla.data.augment import ImageAugment

        augment = ImageAugment(cfg.data.augment, seed=cfg.train.seed)
    transform = SampleTransform(
        normalizer, processor, cfg.model.backbone.prompt_template, cfg.model.state_dim, augment=augment
    )
    # validation never augments: the same chain without the augmenter
    val_transform = SampleTransform(normalizer, processor, cfg.model.backbone.prompt_template, cfg.model.state_dim)
    pad_id = pad_token_id(processor) if processor is not None else 0
    if cache is not None:  # nothing random is left per sample: transform the non-image part once, in memory
        train_raw = preload(train_raw, transform, cfg.train.preload_max_gb, progress and info.is_main)
        val_raw = preload(val_raw, val_transform, cfg.train.preload_max_gb, progress and info.is_main)

    # --- optimisation -------------------------------------------------------------------------------
    # wrap before building the optimizer: FSDP2 replaces parameters with sharded DTensors
    is_fsdp = cfg.train.strategy == "fsdp" and info.enabled
    if cfg.runtime.compile:  # --runtime.compile: sensor encoder + head, in place (parameter names unchanged)
        from sensorvla.runtime import compile_policy

        compile_policy(policy, training=True)
    model = wrap_model(policy, info, cfg.train.strategy)
    groups = build_param_groups(policy, cfg.train)
    optimizer = build_optimizer(groups, cfg.train, sharded=is_fsdp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.train.schedule_steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)
    )
    state = {"epoch": 0, "micro_in_epoch": 0, "step": 0, "best_val": math.inf, "bad_validations": 0, "samples_seen": 0}
    if cfg.train.resume:
        payload, saved_state, rng = ckpt.load_last(ckpt_dir)
        ckpt.load_model_payload(policy, payload, ckpt_dir / ckpt.LAST_NAME)
        optimizer.load_state_dict(payload["optimizer_state_dict"])
        scheduler.load_state_dict(payload["scheduler_state_dict"])
        notes = apply_optimizer_settings(optimizer, scheduler, group_lrs(cfg.train), cfg.train.weight_decay)
        if notes and info.is_main:
            logger.warning("resume: the command line's optimizer settings replace the saved ones: %s", "; ".join(notes))
        if len(rng) != info.world_size:
            raise RuntimeError(
                f"--resume: the run was saved with {len(rng)} processes; resume with the same "
                f"--nproc_per_node (got {info.world_size})"
            )
        ckpt.restore_rng(rng[info.rank])
        state.update(saved_state)
        logger.info("resumed at epoch %d, step %d", state["epoch"], state["step"])

    run_log = RunLogger(
        out_dir, enabled=info.is_main, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb, config=cfg.to_dict()
    )
    if stage1_init is not None:
        run_log.log("stage1_init", 0, stage1_init)
    if info.is_main:
        logger.info("resolved config:\n%s", cfg.to_json())
        logger.info("parameter groups:\n%s", group_table(policy, groups))
        logger.info(
            "dataset: %s | train samples %d, val samples %d | world size %d | %d steps/epoch | "
            "LR schedule over %d steps",
            train_raw.summary(),
            len(train_raw),
            len(val_raw),
            info.world_size,
            steps_per_epoch,
            cfg.train.schedule_steps,
        )
        if cfg.train.stage == "stage2":
            ckpt.backup_if_overwritten(
                ckpt_dir,
                cfg.train.stage1_checkpoint,
                [ckpt.BEST_NAME] + [ckpt.epoch_name(e) for e in range(1, cfg.train.epochs + 1)],
            )

    def gathered() -> tuple[dict | None, dict | None]:
        """Full model/optimizer states on every rank for FSDP2 (collective); None for DDP / 1 process."""
        if not is_fsdp:
            return None, None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(policy, options=opts), get_optimizer_state_dict(policy, optimizer, options=opts)

    def save_last() -> None:
        rngs = all_gather_objects(ckpt.rng_state(), info)
        full, opt_full = gathered()
        if info.is_main:
            payload = ckpt.seed_payload(
                policy,
                optimizer,
                scheduler,
                epoch=state["epoch"],
                val_loss=state["best_val"],
                stage=cfg.train.stage,
                state=full,
                optimizer_state=opt_full,
            )
            run_info = {
                "dataset_fingerprint": fingerprint,
                "schedule_steps": cfg.train.schedule_steps,
                "world_size": info.world_size,
            }
            ckpt.save_last(ckpt_dir, payload, dict(state), rngs, config_json=cfg.to_json(), run_info=run_info)

    # FSDP2 forwards are collective: every rank runs as many validation batches as the largest shard
    val_batches = max(math.ceil(len(val_sampler.indices(r)) / cfg.train.batch_size) for r in range(info.world_size))

    def validate() -> float:
        policy.eval()
        gen = torch.Generator(device=info.device).manual_seed(VAL_SEED)  # the global RNG is never touched
        totals, last, done = [0.0, 0.0], None, 0
        with torch.no_grad(), autocast_ctx(cfg, info.device):
            for batch in make_loader(val_raw, val_transform, val_sampler, cfg, pad_id):
                last = _prepare(batch, cache, info.device)
                loss, _ = policy(last, sensor_loss_weight=1.0, generator=gen)
                n = last["actions"].shape[0]
                totals[0] += float(loss) * n
                totals[1] += n
                done += 1
            while is_fsdp and done < val_batches:  # lockstep filler, not counted
                if last is None:
                    last = _prepare(
                        next(iter(make_loader(val_raw, val_transform, [0], cfg, pad_id))), cache, info.device
                    )
                policy(last, sensor_loss_weight=1.0, generator=gen)
                done += 1
        s, n = all_reduce_sum(totals, info)
        return s / max(n, 1)

    # --- the loop -----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    stop = False
    summary: dict = {"train_loss": [], "val_loss": []}
    desc = f"{cfg.train.stage} {cfg.model.head.type}"
    bar = tqdm(total=run_steps, initial=state["step"], disable=not bar_on, desc=desc)
    t_start, step_start = time.perf_counter(), state["step"]
    try:
        while state["epoch"] < cfg.train.epochs and not stop:
            epoch = state["epoch"]
            train_raw.set_epoch(epoch)  # reseeds VL-staleness draws / the mixture plan
            sampler.set_position(epoch, state["micro_in_epoch"] * cfg.train.batch_size)
            policy.train()
            if cfg.model.finetune.mode == "none":
                policy.backbone.model.eval()
            loader = iter(make_loader(train_raw, transform, sampler, cfg, pad_id))
            while state["micro_in_epoch"] < micro_per_epoch:
                t0 = time.perf_counter()
                n_micro = min(cfg.train.grad_accum_steps, micro_per_epoch - state["micro_in_epoch"])
                share, step_metrics, n_samples = backward_window(
                    model,
                    (next(loader) for _ in range(n_micro)),
                    sensor_loss_weight=cfg.train.sensor_loss_weight,
                    info=info,
                    prepare=functools.partial(_prepare, cache=cache, device=info.device),
                    is_fsdp=is_fsdp,
                    autocast=functools.partial(autocast_ctx, cfg, info.device),
                    n_micro=n_micro,
                )
                state["micro_in_epoch"] += n_micro
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip, foreach=True)
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                    grad_norm = grad_norm.full_tensor()
                mean_loss = all_reduce_sum([share], info)[0] / info.world_size
                if not math.isfinite(mean_loss) or not torch.isfinite(grad_norm):
                    raise TrainingDivergedError(
                        divergence_message(ckpt_dir, mean_loss, float(grad_norm), state["step"] + 1)
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["samples_seen"] += n_samples * info.world_size
                dt = time.perf_counter() - t0
                lrs = {f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups if "no_decay" not in g["name"]}
                row = {
                    "loss": mean_loss,
                    "grad_norm": float(grad_norm),
                    "epoch": epoch,
                    "samples_per_s": n_samples * info.world_size / dt,
                    **lrs,
                    **{k: v for k, v in step_metrics.items() if k.startswith("loss_")},
                }
                summary["train_loss"].append(mean_loss)
                periodic = state["step"] % cfg.train.log_every_steps == 0 or state["step"] in (1, run_steps)
                run_log.log("train", state["step"], row if periodic else {"loss": mean_loss})
                bar.update(1)
                bar.set_postfix(
                    loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", sps=f"{row['samples_per_s']:.1f}"
                )
                if periodic and not bar_on and info.is_main:
                    _log_progress(state["step"], run_steps, epoch, cfg.train.epochs, row, t_start, step_start)
                if cfg.train.save_every_steps and state["step"] % cfg.train.save_every_steps == 0:
                    save_last()
                if cfg.train.max_steps and state["step"] >= cfg.train.max_steps:
                    stop = True
                    break
            epoch_done = state["micro_in_epoch"] >= micro_per_epoch
            if epoch_done:
                state["epoch"] += 1
                state["micro_in_epoch"] = 0
            epoch_label = epoch + 1  # 1-based index of the epoch just run (complete or cut by --max-steps)
            if stop or (
                epoch_done and (state["epoch"] % cfg.train.val_every_epochs == 0 or state["epoch"] == cfg.train.epochs)
            ):
                val = validate() if len(val_raw) else mean_loss
                summary["val_loss"].append(val)
                run_log.log("val", state["step"], {"val_loss": val, "epoch": epoch_label})
                logger.info("epoch %d step %d val_loss %.5f", epoch_label, state["step"], val)
                improved = val < state["best_val"]
                if improved:
                    state["best_val"], state["bad_validations"] = val, 0
                else:
                    state["bad_validations"] += 1
                full, opt_full = gathered()
                if info.is_main:
                    payload = ckpt.seed_payload(
                        policy,
                        optimizer,
                        scheduler,
                        epoch=epoch_label,
                        val_loss=val,
                        stage=cfg.train.stage,
                        state=full,
                        optimizer_state=opt_full,
                    )
                    if cfg.model.head.type == "diffusion":
                        ckpt.save_seed_file(ckpt_dir / ckpt.epoch_name(epoch_label), payload)
                    if improved:
                        ckpt.save_seed_file(ckpt_dir / ckpt.BEST_NAME, payload)
                        save_pretrained(policy, ckpt_dir / "pretrained_model", cfg, stats, state=full)
                if cfg.train.patience and state["bad_validations"] >= cfg.train.patience:
                    logger.info("early stopping: no improvement in %d validations", cfg.train.patience)
                    stop = True
            if epoch_done or stop:
                save_last()
        # decided on rank 0 and broadcast: gathered() is collective, a per-rank file check could split ranks
        if not broadcast_object((ckpt_dir / "pretrained_model").exists(), info):
            full, _ = gathered()
            if info.is_main:
                save_pretrained(policy, ckpt_dir / "pretrained_model", cfg, stats, state=full)
    finally:
        bar.close()
        run_log.close()
        model = optimizer = scheduler = None  # drop DDP + optimizer refs before teardown  # noqa: F841
        teardown(info)
    summary.update(
        best_val=state["best_val"], steps=state["step"], checkpoint_dir=str(ckpt_dir), config=dataclasses.asdict(cfg)
    )
    return summary


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
    from sensorvla.models.processor import SampleTransform, collate

    feature_cache.check_cacheable(cfg)
    ds = raw_dataset(cfg, "all")
    processor = load_processor(
        cfg.model.backbone.vl_model,
        min_pixels=cfg.model.backbone.min_pixels,
        max_pixels=cfg.model.backbone.max_pixels,
        revision=cfg.model.backbone.revision,
    )
    tds = TransformedDataset(
        ds, SampleTransform(normalizer, processor, cfg.model.backbone.prompt_template, cfg.model.state_dim)
    )
    pad = pad_token_id(processor)

    def loader_factory(positions, start):
        subset = torch.utils.data.Subset(tds, positions[start:])
        return torch.utils.data.DataLoader(
            subset,
            batch_size=cfg.train.batch_size,
            num_workers=cfg.data.num_workers,
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
            progress=progress and info.is_main,
            vl_keys=[ds.vl_key(i) for i in range(len(ds))],
        )
    finally:
        teardown(info)
    logger.info("VL cache ready in %s", folder)
    return {"cache_dir": str(folder)}
