"""`EpisodeDataset`: timestamp-aligned raw samples (docs/interfaces.md section 1), episode-level splits,
and weighted mixing of several datasets without duplicating files.

A sample at action frame t takes the newest image of each view at or before t (within the staleness
limit), the newest robot state at or before t, the sensor window (t - W, t] resampled onto T_s points,
and the next H actions. Streams are memory-mapped per worker; only the slices a sample needs are copied.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorvla.config import DataConfig, parse_mixture
from sensorvla.data.format import DatasetMeta, load_meta, read_frames
from sensorvla.data.timeline import latest_at_or_before, resample_window, value_at
from sensorvla.data.types import DataError

logger = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "all")


def default_max_gap_s(cfg: DataConfig) -> float:
    """Largest gap between sensor samples still treated as continuous: two grid steps, at least 20 ms."""
    return max(2 * cfg.sensor_window_s / cfg.sensor_samples, 0.02)


def split_episodes(n: int, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Deterministic episode-level split; each episode lands in exactly one of train / val / test."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = int(round(n * val_fraction)) if n >= 3 else 0
    n_test = int(round(n * test_fraction)) if n >= 3 else 0
    n_val = max(n_val, 1 if val_fraction > 0 and n >= 3 else 0)
    n_test = max(n_test, 1 if test_fraction > 0 and n >= 3 else 0)
    return {
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
        "train": sorted(order[n_val + n_test :]),
    }


class EpisodeDataset(torch.utils.data.Dataset):
    """Raw samples of one dataset split.

    Args:
        root: dataset folder (native format).
        cfg: data config (views, staleness, sensor window, horizon, split fractions, VL staleness).
        split: train | val | test | all.
        load_images: False skips image decoding (stage 1 reading VL features from the cache).
    """

    def __init__(
        self, root: str | Path, cfg: DataConfig, split: str = "train", load_images: bool = True, id_offset: int = 0
    ):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: choose one of {SPLITS}")
        self.root = Path(root)
        self.cfg = cfg
        self.split = split
        self.load_images = load_images
        self.meta: DatasetMeta = load_meta(root)
        self.views = list(cfg.views) or list(self.meta.views)
        missing = sorted(set(self.views) - set(self.meta.views))
        if missing:
            raise DataError(
                f"--data.views {missing} not in the dataset (it has {self.meta.views})",
                path=str(self.root),
                fix="pick views the dataset has",
            )
        self.fps = self.meta.action_fps
        self.epoch = 0
        self.max_gap_s = default_max_gap_s(cfg)
        self._mmaps: dict[tuple[int, str], np.ndarray] = {}
        episodes = list(range(len(self.meta.episodes)))
        if split != "all":
            episodes = split_episodes(len(episodes), cfg.split_seed, cfg.val_fraction, cfg.test_fraction)[split]
        self.episodes = episodes
        frames = read_frames(root)
        ep_col = np.asarray(frames.column("episode_index").to_numpy())
        self._actions = {}
        self._frame_ts = {}
        self._global_index = {}
        all_actions = np.asarray(frames.column("action").to_pylist(), dtype=np.float32)
        ts_col = np.asarray(frames.column("timestamp").to_numpy(), dtype=np.float64)
        idx_col = np.asarray(frames.column("index").to_numpy())
        index: list[tuple[int, int]] = []
        self.dropped = 0
        for e in episodes:
            rows = np.nonzero(ep_col == e)[0]
            self._actions[e] = all_actions[rows]
            self._frame_ts[e] = ts_col[rows]
            self._global_index[e] = idx_col[rows]
            for i, t in enumerate(self._frame_ts[e]):
                if self._valid(e, float(t)):
                    index.append((e, i))
                else:
                    self.dropped += 1
        self.index = index
        self.sample_ids = np.asarray([self._global_index[e][i] + id_offset for e, i in index], dtype=np.int64)

    # --- streams ----------------------------------------------------------------------------------
    def _offset(self, e: int, stream: str) -> float:
        return float(self.meta.episodes[e]["clock_offsets"].get(stream, 0.0))

    def _ts(self, e: int, name: str, stream: str) -> np.ndarray:
        key = (e, name)
        if key not in self._mmaps:
            self._mmaps[key] = np.load(self.meta.stream_dir(e) / name, allow_pickle=False) + self._offset(e, stream)
        return self._mmaps[key]

    def _arr(self, e: int, name: str) -> np.ndarray:
        key = (e, name)
        if key not in self._mmaps:
            self._mmaps[key] = np.load(self.meta.stream_dir(e) / name, mmap_mode="r", allow_pickle=False)
        return self._mmaps[key]

    def _image_index(self, e: int, view: str, t: float) -> int:
        ts = self._ts(e, f"image_{view}_timestamps.npy", f"image.{view}")
        j = latest_at_or_before(ts, t)
        if j < 0 or t - ts[j] > self.cfg.image_staleness_s:
            return -1
        return j

    def _valid(self, e: int, t: float) -> bool:
        if latest_at_or_before(self._ts(e, "state_timestamps.npy", "state"), t) < 0:
            return False
        return all(self._image_index(e, v, t) >= 0 for v in self.views)

    def has_sensor(self, e: int) -> bool:
        return bool(self.meta.episodes[e]["has_sensor"])

    # --- samples ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Reseeds the per-sample VL staleness draw (fast-slow training)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _vl_time(self, idx: int, e: int, t: float) -> float:
        k = self.cfg.vl_max_staleness_steps
        if k <= 0:
            return t
        rng = np.random.default_rng([self.cfg.split_seed, self.epoch, idx])
        t_old = t - int(rng.integers(0, k + 1)) / self.fps
        return t_old if all(self._image_index(e, v, t_old) >= 0 for v in self.views) else t

    def vl_key(self, idx: int) -> tuple:
        """What the backbone sees for sample `idx` (episode, camera frame of each view, instruction), without
        loading images: samples with equal keys have identical VL inputs (the stage-1 cache encodes them once)."""
        e, i = self.index[idx]
        t = self._vl_time(idx, e, float(self._frame_ts[e][i]))
        frames = tuple(self._image_index(e, v, t) for v in self.views)
        return (e, frames, self.meta.episodes[e]["instruction"])

    def __getitem__(self, idx: int) -> dict[str, Any]:
        e, i = self.index[idx]
        t = float(self._frame_ts[e][i])
        sample: dict[str, Any] = {
            "sample_id": int(self.sample_ids[idx]),
            "episode_index": e,
            "frame_index": i,
            "timestamp": t,
            "instruction": self.meta.episodes[e]["instruction"],
            "epoch": self.epoch,  # seeds training-only augmentation (deterministic under resume)
        }
        t_vl = self._vl_time(idx, e, t)
        ages = []
        images = []
        for v in self.views:
            j = self._image_index(e, v, t_vl)
            ages.append(t - float(self._ts(e, f"image_{v}_timestamps.npy", f"image.{v}")[j]))
            if self.load_images:
                images.append(np.array(self._arr(e, f"image_{v}.npy")[j]))
        sample["images"] = images if self.load_images else None
        sample["image_age_s"] = np.asarray(ages, np.float32)
        sample["state"] = value_at(self._ts(e, "state_timestamps.npy", "state"), self._arr(e, "state.npy"), t)
        channels = max(self.meta.sensor_channels, 1)
        if self.has_sensor(e):
            sensor, mask = resample_window(
                self._ts(e, "sensor_timestamps.npy", "sensor"),
                self._arr(e, "sensor.npy"),
                t,
                self.cfg.sensor_window_s,
                self.cfg.sensor_samples,
                self.max_gap_s,
            )
        else:
            sensor = np.zeros((self.cfg.sensor_samples, channels), np.float32)
            mask = np.zeros(self.cfg.sensor_samples, bool)
        sample.update(sensor=sensor, sensor_mask=mask, has_sensor=bool(mask.any()))
        h = self.cfg.horizon
        acts = self._actions[e][i : i + h]
        actions = np.zeros((h, acts.shape[1]), np.float32)  # zero motion past the episode end
        actions[: len(acts)] = acts
        action_mask = np.zeros(h, bool)
        action_mask[: len(acts)] = True
        sample.update(actions=actions, action_mask=action_mask)
        return sample

    def summary(self) -> dict[str, Any]:
        with_sensor = sum(self.has_sensor(e) for e in self.episodes)
        return {
            "dataset": self.meta.dataset_id,
            "split": self.split,
            "episodes": len(self.episodes),
            "samples": len(self),
            "dropped_stale_frames": self.dropped,
            "views": self.views,
            "action_fps": self.fps,
            "sensor_channels": self.meta.sensor_channels,
            "sensor_coverage_pct": round(100.0 * with_sensor / max(len(self.episodes), 1), 1),
        }


class MixtureDataset(torch.utils.data.Dataset):
    """Weighted mixture of datasets. Each epoch draws a deterministic, weight-proportional list of member
    samples (with replacement) of the total size; nothing is copied on disk."""

    def __init__(self, members: list[EpisodeDataset], weights: list[float], seed: int = 0):
        ref = members[0].meta
        for m in members[1:]:
            for key in ("action_dim", "state_dim", "sensor_channels"):
                if getattr(m.meta, key) != getattr(ref, key):
                    raise DataError(
                        f"mixture member {m.root} has {key}={getattr(m.meta, key)}, the first "
                        f"dataset {getattr(ref, key)}",
                        fix="mix datasets with the same features",
                    )
            if m.views != members[0].views:
                raise DataError(
                    f"mixture member {m.root} has views {m.views}, expected {members[0].views}",
                    fix="set --data.views to views every member has",
                )
        self.members, self.seed = members, seed
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.meta = ref
        self.views = members[0].views
        self.sample_ids = np.concatenate([m.sample_ids for m in members])
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        for m in self.members:
            m.set_epoch(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        n = sum(len(m) for m in self.members)
        which = rng.choice(len(self.members), size=n, p=self.weights)
        self._plan = [(int(k), int(rng.integers(0, len(self.members[k])))) for k in which]

    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        k, j = self._plan[idx]
        return self.members[k][j]

    def summary(self) -> dict[str, Any]:
        return {"mixture": [m.summary() for m in self.members], "weights": self.weights.round(3).tolist()}


def build_dataset(cfg: DataConfig, split: str, load_images: bool = True):
    """The dataset of `cfg.dataset_dir`, or a MixtureDataset when `--data.mixture` lists more."""
    primary = EpisodeDataset(cfg.dataset_dir, cfg, split, load_images)
    if not cfg.mixture:
        return primary
    members, weights = [primary], [1.0]
    for k, spec in enumerate(cfg.mixture, start=1):
        path, w = parse_mixture(spec)
        members.append(EpisodeDataset(path, cfg, split, load_images, id_offset=k * 1_000_000_000))
        weights.append(w)
    return MixtureDataset(members, weights, seed=cfg.split_seed)
