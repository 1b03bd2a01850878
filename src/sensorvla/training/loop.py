"""THE training loop: stage 1 and 2, every head, 1..N processes. Stage, head and topology are config.

`train(cfg)` reads top to bottom: setup -> (optional) resume -> epochs of accumulated, clipped, logged
optimizer steps -> validation, early stopping and checkpoints -> clean teardown. `--mode cache` builds
the stage-1 VL feature cache instead (`training/feature_cache.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from sensorvla.config import SensorVLAConfig
from sensorvla.training import checkpoint as ckpt
from sensorvla.training import feature_cache
from sensorvla.training.data_setup import (
    ShardedEpochSampler,
    build_normalizer,
    ensure_stats,
    make_loader,
    raw_dataset,
)
from sensorvla.training.distributed import (
    all_gather_objects,
    all_reduce_sum,
    init_distributed,
    teardown,
    wrap_model,
)
from sensorvla.training.param_groups import build_param_groups, group_table
from sensorvla.training.run_log import RunLogger

logger = logging.getLogger("sensorvla.train")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


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


def train(cfg: SensorVLAConfig, progress: bool = True) -> dict:  # noqa: PLR0915 (flat by design)
    """Run `sensorvla train` with a resolved config. Returns a summary dict (rank 0 values)."""
    cfg.validate()
    info = init_distributed(cfg.train.device)
    _setup_logging(info.is_main)
    torch.manual_seed(cfg.train.seed + info.rank)
    if cfg.train.stage == "stage1" and cfg.model.finetune.mode != "none":
        logger.warning("Stage 1 should use finetune-vl=none (got %s)", cfg.model.finetune.mode)

    from sensorvla.data.format import load_meta
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.pretrained import build_policy, resolve_from_meta, save_pretrained

    meta = load_meta(cfg.data.dataset_dir)
    cfg = resolve_from_meta(cfg, meta)
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    stats = ensure_stats(cfg, info, progress and info.is_main)
    normalizer = build_normalizer(stats, cfg)
    dtype = torch.float32 if cfg.model.finetune.mode == "full" and cfg.model.backbone.dtype == "auto" else None
    policy = build_policy(cfg, device=info.device, dtype=dtype)

    if cfg.train.mode == "cache":
        return _build_cache(cfg, policy, normalizer, info, meta, progress)

    stage1_init = None
    if cfg.train.stage == "stage2" and not cfg.train.resume:
        stage1_init = ckpt.load_stage1_into(policy, cfg.train.stage1_checkpoint)

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
    sampler = ShardedEpochSampler(len(train_raw), seed=cfg.train.seed, rank=info.rank, world=info.world_size)
    val_sampler = ShardedEpochSampler(len(val_raw), seed=0, rank=info.rank, world=info.world_size, shuffle=False)
    micro_per_epoch = math.ceil(len(sampler) / cfg.train.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.train.grad_accum_steps)
    total_steps = steps_per_epoch * cfg.train.epochs

    # --- optimisation -------------------------------------------------------------------------------
    # wrap before building the optimizer: FSDP2 replaces parameters with sharded DTensors
    is_fsdp = cfg.train.strategy == "fsdp" and info.enabled
    model = wrap_model(policy, info, cfg.train.strategy)
    groups = build_param_groups(policy, cfg.train)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)
    )
    state = {"epoch": 0, "micro_in_epoch": 0, "step": 0, "best_val": math.inf, "bad_validations": 0, "samples_seen": 0}
    if cfg.train.resume:
        payload, saved_state, rng = ckpt.load_last(ckpt_dir)
        ckpt.load_model_payload(policy, payload, ckpt_dir / "last")
        optimizer.load_state_dict(payload["optimizer_state_dict"])
        scheduler.load_state_dict(payload["scheduler_state_dict"])
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
            "dataset: %s | train samples %d, val samples %d | world size %d | %d steps/epoch",
            train_raw.summary(),
            len(train_raw),
            len(val_raw),
            info.world_size,
            steps_per_epoch,
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
            ckpt.save_last(ckpt_dir, payload, dict(state), rngs)

    def validate() -> float:
        policy.eval()
        totals = [0.0, 0.0]
        with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast_ctx(cfg, info.device):
            torch.manual_seed(12345)  # identical noise draws every validation (diffusion/flow)
            for batch in make_loader(val_raw, val_transform, val_sampler, cfg, pad_id):
                batch = _prepare(batch, cache, info.device)
                loss, m = policy(batch, sensor_loss_weight=1.0)
                n = batch["actions"].shape[0]
                totals[0] += float(loss) * n
                totals[1] += n
        s, n = all_reduce_sum(totals, info)
        return s / max(n, 1)

    # --- the loop -----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    stop = False
    summary: dict = {"train_loss": [], "val_loss": []}
    bar = tqdm(
        total=min(total_steps, cfg.train.max_steps or total_steps),
        initial=state["step"],
        disable=not (progress and info.is_main),
        desc=f"{cfg.train.stage} {cfg.model.head.type}",
    )
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
                step_metrics: dict[str, float] = {}
                loss_sum, n_samples = 0.0, 0
                for i in range(n_micro):
                    batch = _prepare(next(loader), cache, info.device)
                    sync = i == n_micro - 1 or not info.enabled
                    if is_fsdp:
                        model.set_requires_gradient_sync(sync)
                    no_sync = nullcontext() if sync or is_fsdp or not info.enabled else model.no_sync()
                    with no_sync, autocast_ctx(cfg, info.device):
                        loss, m = model(batch, sensor_loss_weight=cfg.train.sensor_loss_weight)
                        (loss / n_micro).backward()
                    loss_sum += float(loss.detach())
                    n_samples += batch["actions"].shape[0]
                    for k, v in m.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + v / n_micro
                    state["micro_in_epoch"] += 1
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                    grad_norm = grad_norm.full_tensor()
                mean_loss = all_reduce_sum([loss_sum / n_micro], info)[0] / info.world_size
                if not math.isfinite(mean_loss) or not torch.isfinite(grad_norm):
                    raise TrainingDivergedError(
                        f"loss became {mean_loss} (grad norm {float(grad_norm)}) at step {state['step'] + 1}. "
                        f"The last good checkpoint is kept in {ckpt_dir}. Lower --lr / --vl-lr, check the "
                        "data for NaN, or resume with --resume."
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
                if state["step"] % cfg.train.log_every_steps == 0 or state["step"] == 1:
                    run_log.log("train", state["step"], row)
                else:
                    run_log.log("train", state["step"], {"loss": mean_loss})
                bar.update(1)
                bar.set_postfix(
                    loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", sps=f"{row['samples_per_s']:.1f}"
                )
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
        if not (ckpt_dir / "pretrained_model").exists():
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
