"""`EpisodeDataset`: timestamp-aligned raw samples (docs/interfaces.md section 1), episode-level splits,
and weighted mixing of several datasets without duplicating files.

A sample at action frame t takes the newest image of each view at or before t (within the staleness
limit), the newest robot state at or before t, the sensor window (t - W, t] resampled onto T_s points,
and the next H actions. Episodes come from a source (`sensorvla.data.source`): streams are memory-mapped
and frames decoded on access; only the slices a sample needs are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorvla.config import DataConfig, parse_mixture
from sensorvla.data.format import DatasetMeta
from sensorvla.data.source import open_source
from sensorvla.data.timeline import SensorWindow, hold_at, latest_at_or_before, value_at
from sensorvla.data.types import DataError
from sensorvla.data.writer import check_finite

logger = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "all")


def default_max_gap_s(cfg: DataConfig) -> float:
    """Largest gap between sensor samples still treated as continuous: two grid steps, at least 20 ms."""
    return SensorWindow.from_config(cfg).max_gap_s


def wrench_channels(meta: DatasetMeta) -> int:
    """C_f: the leading force channels of the dataset's sensor (0 without a sensor stream)."""
    return min(int(meta.force_channels), int(meta.sensor_channels)) if meta.sensor_channels else 0


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


@dataclass
class _Episode:
    """What a sample of one episode reads: action rows on the common clock and each stream on its own
    clock with its offset (timestamps + offset = common clock). Arrays may be memory maps or lazy frames."""

    name: str
    instruction: str
    frame_tasks: list[str] | None
    t: np.ndarray  # (N_a,) action-row times, common clock
    actions: np.ndarray  # (N_a, D_a)
    state: tuple[np.ndarray, np.ndarray, float]  # own-clock ts (N_st,), values (N_st, D_st), offset
    images: dict[str, tuple[np.ndarray, Any, float]]  # view -> own-clock ts, frames (N_v, h, w, 3), offset
    sensor: tuple[np.ndarray, np.ndarray, float] | None
    streams: dict[str, tuple[np.ndarray, np.ndarray, float] | None]  # declared stream -> ts, (N, *shape), offset


class EpisodeDataset(torch.utils.data.Dataset):
    """Raw samples of one dataset split.

    Args:
        root: dataset folder (any LeRobot v3 folder; ours adds the own-rate sidecar).
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
        self.source = open_source(
            root, sensor_keys=cfg.sensor_keys, tolerance_s=cfg.timestamp_tolerance_s, streams=cfg.streams
        )
        self.meta: DatasetMeta = self.source.meta
        self.streams = [s for s in self.source.streams if s.source]  # streams with their own window
        self.stream_names = [s.name for s in self.streams]
        self.views = resolve_views(cfg.views, self.meta)
        self.fps = self.meta.action_fps
        self.epoch = 0
        self.window = SensorWindow.from_config(cfg)
        self.max_gap_s = self.window.max_gap_s
        self.wrench_channels = wrench_channels(self.meta)
        self._warn_low_rate()
        episodes = list(range(len(self.meta.episodes)))
        if split != "all":
            episodes = split_episodes(len(episodes), cfg.split_seed, cfg.val_fraction, cfg.test_fraction)[split]
        self.episodes = episodes
        self._eps: dict[int, _Episode] = {}
        self._actions: dict[int, np.ndarray] = {}
        self._frame_ts: dict[int, np.ndarray] = {}
        index: list[tuple[int, int]] = []
        ids: list[np.ndarray] = []
        self.dropped = 0
        for e in episodes:
            ep = self._open_episode(e)
            self._eps[e], self._actions[e], self._frame_ts[e] = ep, ep.actions, ep.t
            valid = self._valid_rows(ep)
            rows = np.nonzero(valid)[0]
            index.extend((e, int(i)) for i in rows)
            ids.append(self.source.global_index(e)[rows])
            self.dropped += int((~valid).sum())
        self.index = index
        self.sample_ids = (np.concatenate(ids) if ids else np.zeros(0, np.int64)).astype(np.int64) + id_offset

    # --- streams ----------------------------------------------------------------------------------
    def _open_episode(self, e: int) -> _Episode:
        ep = self.source.load(e)
        off = ep.clock_offsets
        a_t = np.asarray(ep.action_timestamps, np.float64) + off.get("action", 0.0)
        images = {
            v: (np.asarray(ep.images[v].timestamps, np.float64), ep.images[v].frames, off.get(f"image.{v}", 0.0))
            for v in self.views
        }
        sensor = None
        if ep.sensor is not None and len(ep.sensor_timestamps):
            sensor = (ep.sensor_timestamps, ep.sensor, off.get("sensor", 0.0))
        streams = {}
        for spec in self.streams:
            st = self.source.sensor_stream(e, spec.source)
            if st is None or not len(st.timestamps):
                streams[spec.name] = None
                continue
            values = st.values if spec.channels is None else st.values[:, spec.channels[0] : spec.channels[1]]
            streams[spec.name] = (np.asarray(st.timestamps, np.float64), values, st.offset + spec.offset_s)
        return _Episode(
            streams=streams,
            name=ep.name,
            instruction=ep.instruction,
            frame_tasks=ep.extra.get("frame_tasks"),
            t=a_t,
            actions=np.asarray(ep.actions, np.float32),
            state=(np.asarray(ep.state_timestamps, np.float64), ep.state, off.get("state", 0.0)),
            images=images,
            sensor=sensor,
        )

    def _warn_low_rate(self) -> None:
        rate = self.meta.sensor_rate
        if self.meta.sensor_channels and rate and 1.0 / rate > self.max_gap_s:
            logger.warning(
                "the sensor (%s) runs at %.3g Hz, but a sensor window grid point counts as measured only within "
                "%.3g s of a sample: most of each window will be masked. For a low-rate sensor widen the window, "
                "e.g. --data.sensor-window-s %.3g --data.sensor-samples %d",
                "+".join(self.meta.sensor_keys),
                rate,
                self.max_gap_s,
                10.0 / rate,
                10,
            )

    def _image_rows(self, ep: _Episode, view: str, t) -> np.ndarray:
        """Index of the newest frame of `view` at or before t (-1: none, or older than the staleness limit).
        Of several rows holding the same capture (a held video frame), the first one."""
        ts, _, off = ep.images[view]
        t = np.asarray(t, np.float64) - off
        j = np.searchsorted(ts, t, side="right") - 1
        ok = j >= 0
        jj = np.maximum(j, 0)
        ok &= (t - ts[jj]) <= self.cfg.image_staleness_s if ts.size else False
        first = np.searchsorted(ts, ts[jj], side="left") if ts.size else jj
        return np.where(ok, first, -1)

    def _valid_rows(self, ep: _Episode) -> np.ndarray:
        ts, _, off = ep.state
        valid = ep.t >= (ts[0] + off) if len(ts) else np.zeros(len(ep.t), bool)
        for v in self.views:
            valid &= self._image_rows(ep, v, ep.t) >= 0
        return valid

    def has_sensor(self, e: int) -> bool:
        """True when episode `e` has sensor samples."""
        return bool(self.meta.episodes[e]["has_sensor"])

    def sensor_stream(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Episode e's whole sensor stream: timestamps (N_s,) on the common clock, values (N_s, C_s)."""
        ts, values, off = self._eps[e].sensor
        return np.asarray(ts, np.float64) + off, values

    # --- samples ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Reseeds the per-sample VL staleness draw (fast-slow training)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _vl_time(self, idx: int, ep: _Episode, t: float) -> float:
        k = self.cfg.vl_max_staleness_steps
        if k <= 0:
            return t
        rng = np.random.default_rng([self.cfg.split_seed, self.epoch, idx])
        t_old = t - int(rng.integers(0, k + 1)) / self.fps
        return t_old if all(self._image_rows(ep, v, t_old) >= 0 for v in self.views) else t

    def _state_at(self, ep: _Episode, t: float) -> np.ndarray:
        ts, values, off = ep.state
        state = value_at(ts, values, t - off)
        check_finite(state[None], episode=ep.name, stream="state", start=latest_at_or_before(ts, t - off))
        return state

    def _window(self, ep: _Episode, stream, name: str, window: SensorWindow, t: float):
        """The window ending at t of one stream (ts, values, offset): values (T, *shape), mask (T,)."""
        ts, values, off = stream
        lo, hi = window.slice(ts, t - off)
        check_finite(
            values[lo:hi].reshape(hi - lo, int(np.prod(values.shape[1:]))),  # (0, C) for an empty window
            episode=ep.name,
            stream=name,
            start=lo,
            fix="drop or interpolate the corrupt samples and re-create the dataset (or re-attach the sensor)",
        )
        return window.resample(ts, values, t - off)

    def _wrench_target(self, ep: _Episode, i: int) -> dict[str, np.ndarray]:
        """The force channels at the action chunk's times (the action rows i .. i+H-1, common clock), each the
        newest sample at or before its time (`hold_at`, the gap rule of the sensor window): `wrench_target` float32
        (H, C_f) in physical units, `wrench_target_mask` bool (H,), False past the episode end and in sensor gaps."""
        h, c = self.cfg.horizon, self.wrench_channels
        target, mask = np.zeros((h, c), np.float32), np.zeros(h, bool)
        times = ep.t[i : i + h]
        if ep.sensor is not None and len(times):
            ts, values, off = ep.sensor
            held, ok = hold_at(ts, values, times - off, self.max_gap_s)
            check_finite(held[ok], episode=ep.name, stream="sensor (the wrench target at the action times)")
            target[: len(times)], mask[: len(times)] = held[:, :c], ok
        return {"wrench_target": target, "wrench_target_mask": mask}

    def vl_key(self, idx: int) -> tuple:
        """What the backbone sees for sample `idx` (episode, camera frame of each view, instruction), without
        loading images: samples with equal keys have identical VL inputs (the stage-1 cache encodes them once)."""
        e, i = self.index[idx]
        ep = self._eps[e]
        t = self._vl_time(idx, ep, float(ep.t[i]))
        frames = tuple(int(self._image_rows(ep, v, t)) for v in self.views)  # a held frame: its first row
        return (e, frames, ep.frame_tasks[i] if ep.frame_tasks else ep.instruction)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        e, i = self.index[idx]
        ep = self._eps[e]
        t = float(ep.t[i])
        sample: dict[str, Any] = {
            "sample_id": int(self.sample_ids[idx]),
            "episode_index": e,
            "frame_index": i,
            "timestamp": t,
            "instruction": ep.frame_tasks[i] if ep.frame_tasks else ep.instruction,
            "epoch": self.epoch,  # seeds training-only augmentation (deterministic under resume)
        }
        t_vl = self._vl_time(idx, ep, t)
        ages = []
        images = []
        for v in self.views:
            j = int(self._image_rows(ep, v, t_vl))
            ts, frames, off = ep.images[v]
            ages.append(t - (float(ts[j]) + off))
            if self.load_images:
                images.append(np.array(frames[j]))
        sample["images"] = images if self.load_images else None
        sample["image_age_s"] = np.asarray(ages, np.float32)
        sample["state"] = self._state_at(ep, t)
        channels = max(self.meta.sensor_channels, 1)
        if ep.sensor is not None:
            sensor, mask = self._window(ep, ep.sensor, "sensor", self.window, t)
        else:
            sensor, mask = self.window.empty(channels)
        sample.update(sensor=sensor, sensor_mask=mask, has_sensor=bool(mask.any()))
        for spec in self.streams:
            window = self.window.of(spec)
            st = ep.streams[spec.name]
            values, mask = window.empty(spec.shape) if st is None else self._window(ep, st, spec.name, window, t)
            sample.update({spec.key: values, spec.mask_key: mask})
            sample["has_sensor"] |= bool(mask.any())  # "with sensor": any stream has a valid sample
        h = self.cfg.horizon
        acts = ep.actions[i : i + h]
        actions = np.zeros((h, acts.shape[1]), np.float32)  # zero motion past the episode end
        actions[: len(acts)] = acts
        action_mask = np.zeros(h, bool)
        action_mask[: len(acts)] = True
        sample.update(actions=actions, action_mask=action_mask)
        if self.wrench_channels:
            sample.update(self._wrench_target(ep, i))
        return sample

    def summary(self) -> dict[str, Any]:
        """The split's size, views and sensor coverage, for the run log."""
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
            "sensor_keys": self.meta.sensor_keys,
            "sensor_coverage_pct": round(100.0 * with_sensor / max(len(self.episodes), 1), 1),
        }


def resolve_views(wanted, meta: DatasetMeta) -> list[str]:
    """`--data.views` (view names or full camera keys) -> view names; every view when empty."""
    if not wanted:
        return list(meta.views)
    by_key = {c.key: v for v, c in meta.cameras.items()}
    views = [by_key.get(w, w) for w in wanted]
    missing = sorted(set(views) - set(meta.views))
    if missing:
        raise DataError(
            f"--data.views {missing} not in the dataset (it has {meta.views}, keys {sorted(by_key)})",
            path=str(meta.root),
            fix="pick views the dataset has",
        )
    return views


class MixtureDataset(torch.utils.data.Dataset):
    """Weighted mixture of datasets. Each epoch draws a deterministic, weight-proportional list of member
    samples (with replacement) of the total size; nothing is copied on disk."""

    def __init__(self, members: list[EpisodeDataset], weights: list[float], seed: int = 0):
        ref = members[0].meta
        for m in members[1:]:
            for key in ("action_dim", "state_dim", "sensor_channels", "force_channels"):  # force: the tensor's layout
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
        """Reseed augmentation and redraw the weighted member order for `epoch` (deterministic per seed and epoch)."""
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
        """Each member's summary and the normalized mixture weights."""
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
