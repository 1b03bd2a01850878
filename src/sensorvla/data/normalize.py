"""Normalization statistics (computed once, fingerprinted, saved with every checkpoint) and the Normalizer.

A missing key or a fingerprint mismatch raises `NormalizationError` with the fix; data never passes
through unnormalized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.io import atomic_write_json

STAT_NAMES = ("mean", "std", "q01", "q99", "min", "max")
EPS = 1e-6  # std / quantile range floor: constant channels map to 0 instead of dividing by ~0


class NormalizationError(ValueError):
    """Stats do not cover the requested features or belong to another dataset."""


@dataclass
class NormStats:
    """Per feature key ("state", "actions", "sensor"): per-channel mean, std, q01, q99, min, max, count."""

    stats: dict[str, dict[str, np.ndarray]]
    counts: dict[str, int]
    dataset_id: str
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = {
                "dataset_id": self.dataset_id,
                "keys": sorted(self.stats),
                "count": {k: int(v) for k, v in sorted(self.counts.items())},
            }

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset_id": self.dataset_id,
            "fingerprint": self.fingerprint,
            "counts": self.counts,
            "stats": {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in self.stats.items()},
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> NormStats:
        path = Path(path)
        if not path.exists():
            raise NormalizationError(f"{path} not found. Compute it with `sensorvla stats --dataset DIR`")
        d = json.loads(path.read_text())
        stats = {k: {s: np.asarray(v, dtype=np.float32) for s, v in sd.items()} for k, sd in d["stats"].items()}
        return cls(stats, {k: int(v) for k, v in d["counts"].items()}, d["dataset_id"], d["fingerprint"])

    def check(self, expected: dict[str, Any]) -> None:
        """Raise unless `expected` (another fingerprint) matches."""
        if expected != self.fingerprint:
            raise NormalizationError(
                f"normalization stats fingerprint {self.fingerprint} does not match {expected}. The stats were "
                "computed on another dataset or version; recompute them with `sensorvla stats --dataset DIR`."
            )


def _row_counts(meta) -> dict[str, int]:
    """Rows per feature key over the whole dataset, from .npy headers only (memory maps, no data read)."""
    counts = {"actions": int(meta.info["total_frames"]), "state": 0, "sensor": 0}
    for ep in meta.episodes:
        sdir = meta.stream_dir(ep["episode_index"])
        for key, fname in (("state", "state.npy"), ("sensor", "sensor.npy")):
            if (sdir / fname).exists():
                counts[key] += int(np.load(sdir / fname, mmap_mode="r").shape[0])
    return {k: v for k, v in counts.items() if v}


def dataset_fingerprint(root: str | Path) -> dict[str, Any]:
    """The fingerprint stats computed on `root` today would carry: dataset id, keys, row counts."""
    from sensorvla.data.format import load_meta

    meta = load_meta(root)
    counts = _row_counts(meta)
    return {"dataset_id": meta.dataset_id, "keys": sorted(counts), "count": dict(sorted(counts.items()))}


def compute_stats(root: str | Path, progress: bool = True, max_rows_per_episode: int = 20_000) -> NormStats:
    """Stats over every episode: actions (all frames), state (state stream), sensor (measured samples).

    Streams are read through memory maps, one episode at a time; moments and quantiles come from a
    per-episode subsample of at most `max_rows_per_episode` rows (exact for small datasets). The
    fingerprint counts every row.
    """
    from tqdm.auto import tqdm

    from sensorvla.data.format import load_meta, read_frames

    meta = load_meta(root)
    actions = np.asarray(read_frames(root).column("action").to_pylist(), dtype=np.float32)
    chunks: dict[str, list[np.ndarray]] = {"actions": [actions], "state": [], "sensor": []}
    for ep in tqdm(meta.episodes, desc="stats", disable=not progress):
        sdir = meta.stream_dir(ep["episode_index"])
        for key, fname in (("state", "state.npy"), ("sensor", "sensor.npy")):
            if (sdir / fname).exists():
                arr = np.load(sdir / fname, mmap_mode="r")
                step = max(1, len(arr) // max_rows_per_episode)
                chunks[key].append(np.asarray(arr[::step], dtype=np.float32))
    stats = {}
    for key, parts in chunks.items():
        if not parts:
            continue
        x = np.concatenate(parts).astype(np.float64)
        stats[key] = {
            "mean": x.mean(0),
            "std": x.std(0),
            "q01": np.quantile(x, 0.01, axis=0),
            "q99": np.quantile(x, 0.99, axis=0),
            "min": x.min(0),
            "max": x.max(0),
        }
        stats[key] = {k: v.astype(np.float32) for k, v in stats[key].items()}
    return NormStats(stats, _row_counts(meta), meta.dataset_id)


class Normalizer:
    """normalize / unnormalize per feature key, for numpy arrays and torch tensors alike.

    mean_std: (x - mean) / std.  quantile: map [q01, q99] to [-1, 1] (not clipped).
    """

    def __init__(self, stats: NormStats, mode: str = "mean_std"):
        if mode not in ("mean_std", "quantile"):
            raise NormalizationError(f"--data.normalization {mode!r}: choose mean_std or quantile")
        self.stats = stats
        self.mode = mode

    def check_keys(self, keys: list[str]) -> None:
        missing = [k for k in keys if k not in self.stats.stats]
        if missing:
            raise NormalizationError(
                f"normalization stats have no {missing} (they cover {sorted(self.stats.stats)}). "
                "Recompute them with `sensorvla stats --dataset DIR`."
            )

    def _params(self, key: str, like):
        if key not in self.stats.stats:
            self.check_keys([key])
        s = self.stats.stats[key]
        if self.mode == "mean_std":
            shift, scale = s["mean"], np.maximum(s["std"], EPS)
        else:
            shift, scale = (s["q99"] + s["q01"]) / 2, np.maximum((s["q99"] - s["q01"]) / 2, EPS)
        if not isinstance(like, np.ndarray | np.generic):  # a torch tensor
            import torch

            return (
                torch.as_tensor(shift, dtype=like.dtype, device=like.device),
                torch.as_tensor(scale, dtype=like.dtype, device=like.device),
            )
        return shift.astype(np.float32), scale.astype(np.float32)

    def _check_width(self, key: str, x) -> None:
        width = len(self.stats.stats[key]["mean"]) if key in self.stats.stats else None
        if width is not None and x.shape[-1] != width:
            raise NormalizationError(
                f"{key} has {x.shape[-1]} channels but the stats have {width}; the data "
                "and the checkpoint's stats disagree"
            )

    def normalize(self, key: str, x):
        shift, scale = self._params(key, x)
        self._check_width(key, x)
        return (x - shift) / scale

    def unnormalize(self, key: str, x):
        shift, scale = self._params(key, x)
        self._check_width(key, x)
        return x * scale + shift
