"""Training-side data assembly: norm stats, split datasets, the resumable sharded sampler, loaders."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from sensorvla.config import SensorVLAConfig
from sensorvla.data.transforms import TransformedDataset
from sensorvla.models.processor import PolicyProcessor, collate
from sensorvla.runtime import loader_workers

logger = logging.getLogger(__name__)


def pin_hub_ids(cfg: SensorVLAConfig) -> SensorVLAConfig:
    """Resolve hub ids of the run (`--dataset_dir org/name[@rev]`, `--vl-model org/name[@rev]`) in the local hub
    cache (sensorvla/hub.py) and pin them: the dataset becomes its snapshot folder with `data.dataset_hub =
    org/name@<commit>`, the backbone stays `org/name` with `model.backbone.revision = <commit>`. Local folders
    are left as they are. Returns a new config.

    Raises:
        HubCacheMissError: a hub id that is not in the cache offline (the message says how to download it).
    """
    import dataclasses

    from sensorvla import hub

    data, bb = cfg.data, cfg.model.backbone
    if data.dataset_dir and hub.parse(data.dataset_dir) is not None:
        got = hub.resolve(data.dataset_dir, repo_type="dataset")
        data = dataclasses.replace(data, dataset_dir=str(got.path), dataset_hub=got.pinned)
    if hub.parse(bb.vl_model, bb.revision) is not None:
        got = hub.resolve(bb.vl_model, repo_type="model", revision=bb.revision)
        bb = dataclasses.replace(bb, vl_model=got.repo_id, revision=got.commit)
    model = dataclasses.replace(cfg.model, backbone=bb)
    return dataclasses.replace(cfg, data=data, model=model)


def stats_path(dataset_dir: str | Path) -> Path:
    """The dataset's norm_stats.json path (written by `sensorvla stats`, or by the training of an older sensorvla)."""
    return Path(dataset_dir) / "meta" / "norm_stats.json"


def cached_stats_path(cfg: SensorVLAConfig, fingerprint: dict) -> Path:
    """Where training keeps the stats it computed: the user cache (`fingerprint.cache_dir()/norm_stats/`), keyed by
    the dataset fingerprint (content hash, split, sensor keys, counts) and the sensor transform; never the dataset."""
    import hashlib
    import json

    from sensorvla.data.fingerprint import cache_dir
    from sensorvla.data.normalize import transform_spec

    key = json.dumps([fingerprint, transform_spec(cfg.data)], sort_keys=True, default=str)
    return cache_dir() / "norm_stats" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _checked(stats, cfg: SensorVLAConfig, fingerprint):
    from sensorvla.data.normalize import transform_spec

    stats.check(fingerprint)  # stale stats (the dataset, its split or the sensor transform changed) raise
    stats.check_transform(transform_spec(cfg.data))
    return stats


def mixture_roots(cfg: SensorVLAConfig) -> list[str]:
    """The datasets of a `--data.mixture` run, the primary first."""
    from sensorvla.config import parse_mixture

    return [cfg.data.dataset_dir] + [parse_mixture(spec)[0] for spec in cfg.data.mixture]


def ensure_stats(cfg: SensorVLAConfig, info, progress: bool | str = True):
    """The norm stats of the training split with the config's sensor transform. The dataset's own
    meta/norm_stats.json (from `sensorvla stats`) is used when there is one, and must match; otherwise they are
    computed once into the user cache (`cached_stats_path`), never into the dataset: by rank 0, then by any
    process that does not see rank 0's file (another node's cache) — the result is the same.

    A `--data.mixture` run gets stats pooled over the training split of every member (`mixture_fingerprint`), in
    the user cache too: `PolicyRunner` applies one set of stats to a request, which names no member."""
    import json

    from sensorvla.data.normalize import (
        NormalizationError,
        NormStats,
        compute_stats,
        dataset_fingerprint,
        mixture_fingerprint,
    )
    from sensorvla.training.distributed import barrier

    if cfg.data.mixture:
        roots = mixture_roots(cfg)
        fingerprint = json.loads(json.dumps(mixture_fingerprint(roots, cfg.data)))

        def compute():
            return compute_stats(roots[0], progress=progress, data_cfg=cfg.data, members=tuple(roots[1:]))
    else:
        fingerprint = dataset_fingerprint(cfg.data.dataset_dir, cfg.data)
        own = stats_path(cfg.data.dataset_dir)
        if own.exists():
            return _checked(NormStats.load(own), cfg, fingerprint)

        def compute():
            return compute_stats(cfg.data.dataset_dir, progress=progress, data_cfg=cfg.data)

    path = cached_stats_path(cfg, fingerprint)

    def compute_unless_cached() -> None:
        try:
            _checked(NormStats.load(path), cfg, fingerprint)
        except NormalizationError:  # none yet (or an unreadable copy): ours to (re)compute
            logger.info("computing normalization stats into %s (same as `sensorvla stats`)", path)
            compute().save(path)

    if info.is_main:
        compute_unless_cached()
    barrier(info)
    if not info.is_main:
        compute_unless_cached()
    return _checked(NormStats.load(path), cfg, fingerprint)


def build_normalizer(stats, cfg: SensorVLAConfig):
    """The Normalizer over the keys the config uses (actions, plus state and sensor when present)."""
    from sensorvla.data.normalize import Normalizer

    keys = ["actions"]
    if cfg.model.state_dim:
        keys.append("state")
    if cfg.model.sensor.enabled:
        keys.append("sensor")
    norm = Normalizer(stats, mode=cfg.data.normalization, streams=cfg.data.streams)
    norm.check_keys(keys)
    return norm


SMALL_DATASET_EPISODES = 100  # below this, a held-out test split is data the policy could have learnt from
COARSE_TOKENS_PER_SIDE = 4  # warn at <= 4 x 4 VL tokens per view: the hand misses objects (issue 18)


def split_summary(cfg: SensorVLAConfig, n_episodes: int) -> list[str]:
    """Log lines: how many of the dataset's `n_episodes` each split holds (what training never sees), and for a
    small dataset that holds out a test split, how to train on all but the validation fraction."""
    from sensorvla.data.dataset import split_episodes

    d = cfg.data
    parts = {k: len(v) for k, v in split_episodes(n_episodes, d.split_seed, d.val_fraction, d.test_fraction).items()}
    held = parts["val"] + parts["test"]
    lines = [
        f"split of {n_episodes} episodes: {parts['train']} train / {parts['val']} val / {parts['test']} test; "
        f"{held} held out of training ({100 * held / max(n_episodes, 1):.0f} %: --data.val-fraction "
        f"{d.val_fraction:g}, --data.test-fraction {d.test_fraction:g})"
    ]
    if parts["test"] and n_episodes < SMALL_DATASET_EPISODES:
        lines.append(
            f"a small dataset holds out {parts['test']} of its {n_episodes} episodes as a test split training never "
            "sees: --data.test-fraction 0 trains on all but the validation fraction (judge the policy in closed loop "
            "or on --split val; the small-data-stage1/2 presets do this)"
        )
    return lines


def token_grid_lines(processor, cfg: SensorVLAConfig, meta) -> tuple[list[str], list[str]]:
    """(info lines, warnings): the VL token grid of each view the run reads, and a warning with the fix for a view
    of <= 4 x 4 tokens (a 64 px view under the default pixel bounds is resized to 56 px: 2 x 2 tokens)."""
    from sensorvla.models.backbone import token_grid

    info, warnings = [], []
    bb = cfg.model.backbone
    for view, cam in sorted(meta.cameras.items()):
        if cfg.data.views and view not in cfg.data.views:
            continue
        seen = token_grid(processor, int(cam.shape[0]), int(cam.shape[1]))
        if seen is None:
            continue
        (rows, cols), (h, w), side = seen
        info.append(f"view {view!r}: {cam.shape[0]}x{cam.shape[1]} px -> resized to {h}x{w} -> {rows}x{cols} VL tokens")
        if min(rows, cols) <= COARSE_TOKENS_PER_SIDE:
            px = (8 * side) ** 2
            warnings.append(
                f"view {view!r} ({cam.shape[0]}x{cam.shape[1]} px) gives only {rows}x{cols} VL tokens: the processor "
                f"resizes it to {h}x{w} (--model.backbone.min-pixels {bb.min_pixels}, --model.backbone.max-pixels "
                f"{bb.max_pixels}) and each token covers {side}x{side} px, so small objects blur into one token. For "
                f"8x8 tokens upsample the views (--model.backbone.min-pixels {px} --model.backbone.max-pixels {px}) "
                "or use a backbone with smaller patches (e.g. `sensorvla tiny-model --patch-size 7`)"
            )
    return info, warnings


def log_token_grid(processor, cfg: SensorVLAConfig) -> None:
    """Log each view's VL token grid; warn (with the fix) where it is <= 4 x 4 tokens (`token_grid_lines`)."""
    from sensorvla.data.format import load_meta

    info, warnings = token_grid_lines(processor, cfg, load_meta(cfg.data.dataset_dir))
    for line in info:
        logger.info("%s", line)
    for line in warnings:
        logger.warning("%s", line)


def raw_dataset(cfg: SensorVLAConfig, split: str, load_images: bool = True):
    """The raw dataset (or mixture) of `cfg.data` for a split."""
    from sensorvla.data.dataset import build_dataset

    return build_dataset(cfg.data, split, load_images=load_images)


def evenly_spaced(n: int, k: int) -> list[int]:
    """k of the indices 0..n-1, spread evenly (every episode of a split ordered by episode is represented);
    all n when k is 0 or at least n."""
    if k <= 0 or k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


class ShardedEpochSampler(torch.utils.data.Sampler[int]):
    """Deterministic per-epoch permutation, split across ranks, able to start mid-epoch (resume).

    `pad=True` (training): every rank gets the same number of indices (the permutation is padded by
    wrapping around), so DDP ranks step in lockstep. `pad=False` (validation): an exact partition, each
    index on exactly one rank (counts may differ by one), so all-reduced sums count every sample once.
    """

    def __init__(
        self, n: int, *, seed: int, rank: int, world: int, shuffle: bool = True, pad: bool = True, limit: int = 0
    ):
        """`limit` > 0 (validation, `shuffle=False`): only `evenly_spaced(n, limit)` of the n indices."""
        if limit and shuffle:
            raise ValueError("ShardedEpochSampler: limit selects a fixed subset, so it needs shuffle=False")
        self.subset = evenly_spaced(n, limit) if limit else None
        n = len(self.subset) if self.subset is not None else n
        self.n, self.seed, self.rank, self.world, self.shuffle, self.pad = n, seed, rank, world, shuffle, pad
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Start the next `indices()` at `epoch`, skipping the first `start` (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def indices(self, rank: int | None = None) -> list[int]:
        """This rank's (or `rank`'s) indices for the current epoch."""
        rank = self.rank if rank is None else rank
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(self.subset) if self.subset is not None else list(range(self.n))
        if self.pad:
            per_rank = math.ceil(self.n / self.world)
            order = (order * math.ceil(per_rank * self.world / max(self.n, 1) + 1))[: per_rank * self.world]
        return order[rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return len(self.indices()) - self.start


class PreloadedSamples(torch.utils.data.Dataset):
    """A dataset's transformed samples, computed once and held in memory (stage 1 from the VL cache, where
    a sample is only its sensor window, state and actions: nothing random, no image). Batches are the
    ones the lazy path gives, bit for bit; only the per-step parquet/sidecar reads and resampling go."""

    def __init__(self, raw_dataset, transform, progress: bool | str = False):
        from sensorvla.progress import progress as track

        self.raw = raw_dataset
        self.items = [transform(raw_dataset[i]) for i in track(range(len(raw_dataset)), desc="preload", mode=progress)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def set_epoch(self, epoch: int) -> None:
        """Nothing depends on the epoch (cached stage 1 refuses VL staleness and mixtures)."""

    def summary(self) -> dict:
        """The raw dataset's summary, marked preloaded."""
        return {**self.raw.summary(), "preloaded": True}


def preload(raw_dataset, transform, max_gb: float, progress: bool | str = False):
    """`PreloadedSamples` when the transformed samples fit in `max_gb` (`--train.preload-max-gb`, 0 = never),
    else the dataset itself. The size is measured on the first sample."""
    n = len(raw_dataset)
    if max_gb <= 0 or n == 0:
        return raw_dataset
    first = transform(raw_dataset[0])
    need = n * sum(t.numel() * t.element_size() for t in first.values() if torch.is_tensor(t))
    if need > max_gb * 1e9:
        logger.info("not preloading %d samples (%.2f GB > --train.preload-max-gb %g)", n, need / 1e9, max_gb)
        return raw_dataset
    return PreloadedSamples(raw_dataset, transform, progress)


def make_loader(dataset, transform: PolicyProcessor, sampler, cfg: SensorVLAConfig, pad_token_id: int):
    """The DataLoader of one split: transform per sample (unless preloaded), then `collate`; workers per
    `--data.num-workers` (`runtime.loader_workers`: auto is 0 for preloaded samples)."""
    preloaded = isinstance(dataset, PreloadedSamples)
    return torch.utils.data.DataLoader(
        dataset if preloaded else TransformedDataset(dataset, transform),
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=loader_workers(cfg.data.num_workers, in_memory=preloaded),
        collate_fn=functools.partial(collate, pad_token_id=pad_token_id),
        persistent_workers=False,
        # a private generator: creating loaders never consumes the global RNG (resume equality)
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
