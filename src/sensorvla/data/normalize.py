"""Normalization statistics (computed once on the training split, fingerprinted, saved with every
checkpoint), the sensor transforms applied before them, and the Normalizer.

The fingerprint is the dataset id, a content hash of the data files (`sensorvla.data.fingerprint`), the
split the stats were computed on, and the row counts. A missing key, a fingerprint mismatch or a sensor
transform that differs from the config raises `NormalizationError` with the fix; data never passes
through unnormalized. The sensor transform is saved inside the stats, so training and `PolicyRunner`
(both go through the Normalizer) apply exactly the same one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.io import atomic_write_json
from sensorvla.progress import progress as track
from sensorvla.streams import parse_stream

EPS = 1e-6  # std / quantile range floor: constant channels map to 0 instead of dividing by ~0
# The wrench output's target (the sensor's leading force channels): normalized with the sensor's statistics and
# sensor transform of those channels, so it has no entry of its own in norm_stats.json.
WRENCH = "wrench"
#: a declared stream's `transform=signed_log1p`: every element, its scale the median |x| of the training split
STREAM_LOG1P = {"transform": "signed_log1p", "clip_quantile": 0.0, "channels": "all", "log_scale": 0.0}
STATS_FIX = "recompute them with `sensorvla stats --dataset DIR` (with the same --data flags as training)"


class NormalizationError(ValueError):
    """Stats do not cover the requested features or belong to another dataset."""


# --- sensor transforms ------------------------------------------------------------------------------------
def transform_spec(data_cfg) -> dict[str, Any]:
    """The sensor-transform part of a DataConfig, as saved in norm_stats.json."""
    if data_cfg is None or (data_cfg.sensor_transform == "none" and data_cfg.sensor_clip_quantile == 0):
        return {"transform": "none", "clip_quantile": 0.0}
    spec = {"transform": data_cfg.sensor_transform, "clip_quantile": float(data_cfg.sensor_clip_quantile)}
    if data_cfg.sensor_transform != "none":
        spec.update(channels=data_cfg.sensor_transform_channels, log_scale=float(data_cfg.sensor_log_scale))
    return spec


def spec_flags(spec: dict[str, Any]) -> str:
    """The `sensorvla stats` / train flags that produce `spec`."""
    flags = [f"--data.sensor-transform {spec['transform']}"]
    if spec["transform"] != "none":
        flags += [
            f"--data.sensor-transform-channels {spec['channels']}",
            f"--data.sensor-log-scale {spec['log_scale']}",
        ]
    flags.append(f"--data.sensor-clip-quantile {spec['clip_quantile']}")
    return " ".join(flags)


def signed_log1p(x, scale):
    """sign(x) * log1p(|x| / scale), for numpy arrays and torch tensors."""
    if isinstance(x, np.ndarray | np.generic):
        return np.sign(x) * np.log1p(np.abs(x) / scale)
    import torch

    return torch.sign(x) * torch.log1p(torch.abs(x) / scale)


@dataclass
class SensorTransform:
    """Per-channel transform before normalization: clip to [lo, hi], then signed_log1p where `log_mask`.

    Arrays are (C,) and come from the training split; `spec` is the config that made them.
    """

    spec: dict[str, Any]
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    log_mask: np.ndarray | None = None
    log_scale: np.ndarray | None = None

    @classmethod
    def fit(cls, spec: dict[str, Any], x: np.ndarray, force_channels: int) -> SensorTransform:
        """Fit the per-channel parameters on training samples x (N, C)."""
        t = cls(spec)
        if spec["clip_quantile"] > 0:
            q = spec["clip_quantile"]
            t.lo = np.quantile(x, q, axis=0).astype(np.float32)
            t.hi = np.quantile(x, 1 - q, axis=0).astype(np.float32)
            x = np.clip(x, t.lo, t.hi)
        if spec["transform"] == "signed_log1p":
            c = x.shape[1]
            mask = np.zeros(c, bool)
            mask[: (min(force_channels, c) if spec["channels"] == "force" else c)] = True
            if spec["log_scale"] > 0:
                scale = np.full(c, spec["log_scale"], np.float32)
            else:
                scale = np.maximum(np.median(np.abs(x), axis=0), EPS).astype(np.float32)
            t.log_mask, t.log_scale = mask, scale
        return t

    def __call__(self, x):
        """(..., C) -> transformed (..., C); numpy or torch, as given."""
        if self.lo is not None:
            if isinstance(x, np.ndarray | np.generic):
                x = np.clip(x, self.lo, self.hi)
            else:
                import torch

                x = torch.clamp(x, torch.as_tensor(self.lo, dtype=x.dtype), torch.as_tensor(self.hi, dtype=x.dtype))
        if self.log_mask is not None:
            if isinstance(x, np.ndarray | np.generic):
                x = np.where(self.log_mask, signed_log1p(x, self.log_scale), x).astype(np.float32)
            else:
                import torch

                mask = torch.as_tensor(self.log_mask, device=x.device)
                scale = torch.as_tensor(self.log_scale, dtype=x.dtype, device=x.device)
                x = torch.where(mask, signed_log1p(x, scale), x)
        return x

    def to_json(self) -> dict[str, Any]:
        """The fitted transform as JSON (saved in norm_stats.json)."""
        out: dict[str, Any] = {"spec": self.spec}
        for k in ("lo", "hi", "log_mask", "log_scale"):
            v = getattr(self, k)
            if v is not None:
                out[k] = np.asarray(v).tolist()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SensorTransform:
        """The transform saved by `to_json`."""
        t = cls(d["spec"])
        for k, dtype in (("lo", np.float32), ("hi", np.float32), ("log_mask", bool), ("log_scale", np.float32)):
            if k in d:
                setattr(t, k, np.asarray(d[k], dtype=dtype))
        return t

    def leading(self, n: int) -> SensorTransform:
        """The transform of the first `n` channels (the force channels: the wrench output's)."""
        out = SensorTransform(self.spec)
        for k in ("lo", "hi", "log_mask", "log_scale"):
            v = getattr(self, k)
            if v is not None:
                setattr(out, k, np.asarray(v)[:n])
        return out

    def invert(self, x):
        """The inverse of the log part: (..., C) transformed -> physical (numpy or torch). A clipped value stays at
        its clip bound (clipping cannot be undone)."""
        if self.log_mask is None:
            return x
        if isinstance(x, np.ndarray | np.generic):
            phys = np.sign(x) * np.expm1(np.abs(x)) * self.log_scale
            return np.where(self.log_mask, phys, x).astype(np.float32)
        import torch

        scale = torch.as_tensor(self.log_scale, dtype=x.dtype, device=x.device)
        phys = torch.sign(x) * torch.expm1(torch.abs(x)) * scale
        return torch.where(torch.as_tensor(self.log_mask, device=x.device), phys, x)

    @property
    def identity(self) -> bool:
        """True when the transform changes nothing (no clipping, no log)."""
        return self.lo is None and self.log_mask is None


# --- stats ------------------------------------------------------------------------------------------------
def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def validate_stats_json(d: Any, path: str | Path) -> None:
    """Refuse (NormalizationError naming the file, the key and the fix) statistics that would normalize wrongly:
    a missing section, a value that is not a number (a string, a bool, a nested list), non-finite values,
    a negative std, per-key stats of different lengths, q01 > q99 or min > max. A std of 0 is a constant
    channel (the Normalizer floors it at EPS)."""

    def bad(msg: str) -> NormalizationError:
        return NormalizationError(f"{path}: {msg}; {STATS_FIX}, or copy the checkpoint folder again")

    if not isinstance(d, dict) or not all(k in d for k in ("stats", "counts", "dataset_id", "fingerprint")):
        raise bad("not a norm_stats.json (needs stats, counts, dataset_id, fingerprint)")
    if not isinstance(d["stats"], dict) or not isinstance(d["counts"], dict):
        raise bad("'stats' and 'counts' must be objects")
    for key, sd in d["stats"].items():
        if not isinstance(sd, dict) or not {"mean", "std"} <= set(sd):
            raise bad(f"stats[{key!r}] must hold at least mean and std")
        lengths = {}
        for name, v in sd.items():
            values = v if isinstance(v, list) else [v]
            if not values or not all(_is_number(x) for x in values):
                raise bad(f"stats[{key!r}][{name!r}] must be a list of numbers, got {str(v)[:80]}")
            arr = np.asarray(values, np.float64)
            if not np.all(np.isfinite(arr)):
                raise bad(f"stats[{key!r}][{name!r}] holds NaN/inf")
            lengths[name] = len(values)
        if len(set(lengths.values())) > 1:
            raise bad(f"stats[{key!r}] has statistics of different lengths {lengths}")
        std = np.asarray(sd["std"], np.float64)
        if np.any(std < 0):
            raise bad(f"stats[{key!r}]['std'] is negative at channel {int(np.argmax(std < 0))}")
        for lo, hi in (("q01", "q99"), ("min", "max")):
            if lo in sd and hi in sd and np.any(np.asarray(sd[lo], np.float64) > np.asarray(sd[hi], np.float64)):
                raise bad(f"stats[{key!r}] has {lo} > {hi}")
    for key, v in d["counts"].items():
        if not _is_number(v) or v < 0:
            raise bad(f"counts[{key!r}] must be a non-negative number, got {v!r}")
    tf = d.get("sensor_transform")
    if tf is not None:
        if not isinstance(tf, dict) or not isinstance(tf.get("spec"), dict):
            raise bad("'sensor_transform' must be an object with a 'spec'")
        for name in ("lo", "hi", "log_scale"):
            if name in tf:
                v = tf[name]
                if not isinstance(v, list) or not all(_is_number(x) for x in v) or not np.all(np.isfinite(v)):
                    raise bad(f"sensor_transform[{name!r}] must be a list of finite numbers")
        if "log_scale" in tf and np.any(np.asarray(tf["log_scale"], np.float64) <= 0):
            raise bad("sensor_transform['log_scale'] must be > 0")


@dataclass
class NormStats:
    """Per feature key ("state", "actions", "sensor"): per-channel mean, std, q01, q99, min, max, count."""

    stats: dict[str, dict[str, np.ndarray]]
    counts: dict[str, int]
    dataset_id: str
    fingerprint: dict[str, Any] = field(default_factory=dict)
    sensor_transform: SensorTransform | None = None

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = {
                "dataset_id": self.dataset_id,
                "keys": sorted(self.stats),
                "count": {k: int(v) for k, v in sorted(self.counts.items())},
            }
        if self.sensor_transform is None:
            self.sensor_transform = SensorTransform(transform_spec(None))

    def to_json(self) -> dict[str, Any]:
        """The stats as JSON (norm_stats.json): dataset id, fingerprint, counts, sensor transform, per-key stats."""
        return {
            "dataset_id": self.dataset_id,
            "fingerprint": self.fingerprint,
            "counts": self.counts,
            "sensor_transform": self.sensor_transform.to_json(),
            "stats": {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in self.stats.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write the stats to `path` atomically."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> NormStats:
        """Read and validate norm_stats.json; NormalizationError naming the file (and `sensorvla stats`) when it
        is missing, not JSON, or holds invalid statistics (`validate_stats_json`)."""
        path = Path(path)
        if not path.exists():
            raise NormalizationError(f"{path} not found. Compute it with `sensorvla stats --dataset DIR`")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise NormalizationError(
                f"{path} is not readable JSON ({type(e).__name__}: {e}; truncated?); {STATS_FIX}, or copy the "
                "checkpoint folder again"
            ) from e
        validate_stats_json(d, path)
        stats = {k: {s: np.asarray(v, dtype=np.float32) for s, v in sd.items()} for k, sd in d["stats"].items()}
        bad = [k for k, sd in stats.items() if not all(np.all(np.isfinite(v)) for v in sd.values())]
        if bad:
            raise NormalizationError(f"{path} holds NaN/inf statistics for {bad} (as float32); {STATS_FIX}")
        tf = SensorTransform.from_json(d["sensor_transform"]) if "sensor_transform" in d else None
        return cls(stats, {k: int(v) for k, v in d["counts"].items()}, d["dataset_id"], d["fingerprint"], tf)

    def check_dims(self, dims: dict[str, int], where: str | Path) -> None:
        """Raise unless each key's statistics (and the sensor transform) have `dims[key]` channels."""
        for key, width in dims.items():
            if key not in self.stats or not width:
                continue
            got = {s: len(np.atleast_1d(v)) for s, v in self.stats[key].items()}
            if set(got.values()) != {int(width)}:
                raise NormalizationError(
                    f"{where}: the {key!r} statistics have {got} channels, the model {width}; the stats belong to "
                    f"another dataset or were edited. {STATS_FIX}, or copy the checkpoint folder again"
                )
        width = dims.get("sensor")
        tf = self.sensor_transform
        for name in ("lo", "hi", "log_mask", "log_scale"):
            v = getattr(tf, name)
            if width and v is not None and len(np.atleast_1d(v)) != int(width):
                raise NormalizationError(
                    f"{where}: the sensor transform's {name} has {len(np.atleast_1d(v))} channels, the model "
                    f"{width}; {STATS_FIX}"
                )

    def check(self, expected: dict[str, Any]) -> None:
        """Raise unless `expected` (another fingerprint) matches."""
        if expected != self.fingerprint:
            diff = sorted(
                k for k in set(expected) | set(self.fingerprint) if expected.get(k) != self.fingerprint.get(k)
            )
            raise NormalizationError(
                f"normalization stats fingerprint differs in {diff} (stats: "
                f"{ {k: self.fingerprint.get(k) for k in diff} }, dataset: { {k: expected.get(k) for k in diff} }). "
                f"The stats were computed on another dataset, version or split; {STATS_FIX}."
            )

    def check_transform(self, spec: dict[str, Any]) -> None:
        """Raise unless the stats were computed with the sensor transform `spec` (from the config)."""
        saved = self.sensor_transform.spec
        if saved != spec:
            raise NormalizationError(
                f"the config asks for the sensor transform {spec}, but the normalization stats were computed with "
                f"{saved}. Recompute them: `sensorvla stats --dataset DIR {spec_flags(spec)}` (or delete "
                "meta/norm_stats.json; training then recomputes it), or set the flags back to "
                f"`{spec_flags(saved)}`."
            )


def _split_info(n_episodes: int, data_cfg, split: str) -> tuple[list[int], dict[str, Any]]:
    from sensorvla.data.dataset import split_episodes

    seed, vf, tf = data_cfg.split_seed, data_cfg.val_fraction, data_cfg.test_fraction
    eps = list(range(n_episodes)) if split == "all" else split_episodes(n_episodes, seed, vf, tf)[split]
    ids = np.asarray(eps, np.int64)
    return eps, {
        "name": split,
        "seed": int(seed),
        "val_fraction": float(vf),
        "test_fraction": float(tf),
        "episodes": eps,
        "episodes_sha256": hashlib.sha256(ids.tobytes()).hexdigest()[:16],
    }


def _row_counts(meta, episodes: list[int]) -> dict[str, int]:
    """Rows per feature key over `episodes`, from the metadata and stream indexes only (no data read)."""
    counts = {"actions": sum(int(meta.episodes[e]["length"]) for e in episodes), "state": 0, "sensor": 0}
    state = meta.streams.get("observation.state")
    for e in episodes:
        counts["state"] += (
            int(state.index[e]["num_samples"]) if state and state.has(e) else int(meta.episodes[e]["length"])
        )
    keys = meta.sensor_keys
    if len(keys) == 1 and keys[0] in meta.streams:
        s = meta.streams[keys[0]]
        counts["sensor"] = sum(int(s.index[e]["num_samples"]) for e in episodes if s.has(e))
    elif keys:
        counts["sensor"] = counts["actions"]
    if meta.state_dim == 0:
        counts["state"] = 0
    return {k: v for k, v in counts.items() if v}


def _default_cfg(data_cfg):
    if data_cfg is not None:
        return data_cfg
    from sensorvla.config import DataConfig

    return DataConfig()


def dataset_fingerprint(root: str | Path, data_cfg=None, split: str = "train") -> dict[str, Any]:
    """The fingerprint stats computed on `root` (that split of `data_cfg`) today would carry."""
    from sensorvla.data.fingerprint import content_hash
    from sensorvla.data.format import load_meta

    data_cfg = _default_cfg(data_cfg)
    meta = load_meta(root, sensor_keys=data_cfg.sensor_keys)
    eps, split_info = _split_info(len(meta.episodes), data_cfg, split)
    counts = _row_counts(meta, eps)
    fp = {
        "dataset_id": meta.dataset_id,
        "content_sha256": content_hash(root),
        "split": split_info,
        "sensor_keys": list(meta.sensor_keys),
        "keys": sorted(counts),
        "count": dict(sorted(counts.items())),
    }
    streams = [s.to_text() for s in meta.resolve_streams(data_cfg.streams) if s.source]
    return fp | {"streams": streams} if streams else fp  # stats of other streams are other stats


def mixture_fingerprint(roots: list[str | Path], data_cfg=None, split: str = "train") -> dict[str, Any]:
    """The fingerprint of stats pooled over the `split` episodes of every dataset of a mixture (`roots`, the
    primary first): each member's `dataset_fingerprint`, and the summed row counts."""
    members = [dataset_fingerprint(r, data_cfg, split) for r in roots]
    counts: dict[str, int] = {}
    for fp in members:
        for k, v in fp["count"].items():
            counts[k] = counts.get(k, 0) + int(v)
    return {
        "dataset_id": "mixture(" + ", ".join(fp["dataset_id"] for fp in members) + ")",
        "members": members,
        "keys": sorted(counts),
        "count": dict(sorted(counts.items())),
    }


def _moments(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float64)
    out = {
        "mean": x.mean(0),
        "std": x.std(0),
        "q01": np.quantile(x, 0.01, axis=0),
        "q99": np.quantile(x, 0.99, axis=0),
        "min": x.min(0),
        "max": x.max(0),
    }
    return {k: v.astype(np.float32) for k, v in out.items()}


def compute_stats(
    root: str | Path,
    progress: bool | str = True,
    max_rows_per_episode: int = 20_000,
    *,
    data_cfg=None,
    split: str = "train",
    members: tuple[str | Path, ...] = (),
) -> NormStats:
    """Stats over the `split` episodes of `data_cfg` (default: the training split of the default config):
    actions (all frames), state (its stream), sensor (measured samples, after the sensor transform).
    `members`: the other datasets of a `--data.mixture`, whose `split` episodes are pooled with root's (one set of
    stats, `mixture_fingerprint`, that covers every member: the runner applies one at inference).

    Streams are read through memory maps, one episode at a time; moments and quantiles come from a
    per-episode subsample of at most `max_rows_per_episode` rows (exact for small datasets). First every
    episode of the dataset (any split) is checked and every video decoded (`LeRobotSource.check_all`): a
    NaN/inf, a value beyond MAX_ABS, a bad clock or a damaged video raises DataError naming the episode,
    stream, column and sample (or the file).
    """
    from sensorvla.data.source import open_source
    from sensorvla.data.writer import check_finite

    data_cfg = _default_cfg(data_cfg)
    src = open_source(
        root, sensor_keys=data_cfg.sensor_keys, tolerance_s=data_cfg.timestamp_tolerance_s, streams=data_cfg.streams
    )
    src.check_all(progress)  # every episode (not only the split's) and every video frame, before any stats
    meta = src.meta
    eps, _ = _split_info(len(meta.episodes), data_cfg, split)
    if not eps:
        raise NormalizationError(
            f"the {split} split of {root} has no episodes; lower --data.val-fraction/test-fraction"
        )
    sources = [src] + [
        open_source(
            m, sensor_keys=data_cfg.sensor_keys, tolerance_s=data_cfg.timestamp_tolerance_s, streams=data_cfg.streams
        )
        for m in members
    ]
    todo = [
        (s, e) for s in sources for e in (eps if s is src else _split_info(len(s.meta.episodes), data_cfg, split)[0])
    ]
    chunks: dict[str, list[np.ndarray]] = {"actions": [], "state": [], "sensor": []}
    for source, e in track(todo, desc="stats", unit="episodes", mode=progress):
        ep = source.load(e)
        chunks["actions"].append(np.asarray(ep.actions, np.float32))
        parts = [("state", ep.state)]
        if ep.sensor is not None:
            parts.append(("sensor", ep.sensor))
        for spec in (sp for sp in source.streams if sp.source):  # per element of each declared stream's sample
            st = source.sensor_stream(e, spec.source)
            if st is not None:
                flat = st.values.reshape(len(st.values), -1)
                parts.append((spec.key, flat if spec.channels is None else flat[:, slice(*spec.channels)]))
        for key, arr in parts:
            if key == "state" and meta.state_dim == 0:
                continue
            step = max(1, len(arr) // max_rows_per_episode)
            # every row is checked for NaN/inf, in blocks (memory-mapped), only a subsample is kept
            for lo in range(0, len(arr), 65536):
                check_finite(arr[lo : lo + 65536], episode=ep.name, stream=key, start=lo)
            chunks.setdefault(key, []).append(np.asarray(arr[::step], dtype=np.float32))
    spec = transform_spec(data_cfg)
    logged = {s.key for s in src.streams if s.source and s.transform == "signed_log1p"}
    stats, transform = {}, SensorTransform(spec)
    for key, parts in ((k, p) for k, p in chunks.items() if p):
        stats[key], fitted = _key_stats(key, np.concatenate(parts), spec, meta.force_channels, key in logged)
        transform = fitted or transform
    if members:
        fp = mixture_fingerprint([root, *members], data_cfg, split)
        return NormStats(stats, dict(fp["count"]), fp["dataset_id"], fp, transform)
    fp = dataset_fingerprint(root, data_cfg, split)
    return NormStats(stats, dict(fp["count"]), meta.dataset_id, fp, transform)


def _key_stats(key: str, x: np.ndarray, spec: dict, force_channels: int, log1p: bool):
    """One key's moments and the sensor transform fitted for it (`sensor` only, else None): after that transform
    for `sensor`; after signed_log1p for a declared stream's `transform=signed_log1p` (`log1p`), whose per-element
    scale is kept beside its moments as `log_scale`."""
    transform = None
    if key == "sensor":
        transform = SensorTransform.fit(spec, x, force_channels)
        x = transform(x)
    if not log1p:
        return _moments(x), transform
    log_scale = SensorTransform.fit(STREAM_LOG1P, x, 0).log_scale
    return _moments(signed_log1p(x, log_scale)) | {"log_scale": log_scale}, transform


class Normalizer:
    """normalize / unnormalize per feature key, for numpy arrays and torch tensors alike.

    mean_std: (x - mean) / std.  quantile: map [q01, q99] to [-1, 1] (not clipped). The sensor goes
    through the stats' sensor transform first (clip, signed_log1p), so training and inference match.
    `streams` (the config's declared streams): a stream's own `normalization` (mean_std, quantile, none) replaces
    `mode` for its key `sensor.<name>`, and its `transform=signed_log1p` applies the stats' `log_scale` first.
    """

    def __init__(self, stats: NormStats, mode: str = "mean_std", streams=()):
        if mode not in ("mean_std", "quantile"):
            raise NormalizationError(f"--data.normalization {mode!r}: choose mean_std or quantile")
        self.stats = stats
        self.mode = mode
        self._cache: dict[tuple, tuple] = {}  # `_params`: (key, ...) -> (shift, scale)
        specs = [s if not isinstance(s, str) else parse_stream(s) for s in streams]
        self.modes = {s.key: s.normalization for s in specs if s.source and s.normalization}
        for s in (s for s in specs if s.source and s.key in stats.stats):
            if (s.transform == "signed_log1p") != ("log_scale" in stats.stats[s.key]):
                raise NormalizationError(
                    f"stream {s.name!r} declares transform={s.transform or 'none'}, but the normalization stats were "
                    f"computed {'without' if s.transform == 'signed_log1p' else 'with'} it. {STATS_FIX}"
                )

    def check_keys(self, keys: list[str]) -> None:
        """Raise NormalizationError naming the keys the stats do not cover."""
        missing = [k for k in keys if k not in self.stats.stats]
        if missing:
            raise NormalizationError(
                f"normalization stats have no {missing} (they cover {sorted(self.stats.stats)}). "
                "Recompute them with `sensorvla stats --dataset DIR`."
            )

    def _params(self, key: str, like):
        """(shift, scale) of `key` as float32 numpy arrays, or as tensors in `like`'s dtype and device; computed once
        per key (and per dtype and device) and reused: the runner normalizes several keys on every call."""
        width = like.shape[-1] if key == WRENCH else None
        as_numpy = isinstance(like, np.ndarray | np.generic)
        cache_key = (key, width) if as_numpy else (key, width, like.dtype, like.device)
        found = self._cache.get(cache_key)
        if found is not None:
            return found
        shift, scale = self._affine(key, width)
        if as_numpy:
            found = shift.astype(np.float32), scale.astype(np.float32)
            for a in found:
                a.flags.writeable = False  # shared by every call
        else:
            import torch

            with torch.inference_mode(False):  # normal tensors: reusable with autograd too
                found = (
                    torch.as_tensor(shift, dtype=like.dtype, device=like.device),
                    torch.as_tensor(scale, dtype=like.dtype, device=like.device),
                )
        self._cache[cache_key] = found
        return found

    def _affine(self, key: str, width: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(shift, scale) of `key` from its statistics and normalization mode (the wrench: the sensor's first
        `width` channels)."""
        if key == WRENCH:  # the leading channels of the sensor's statistics
            self.check_keys(["sensor"])
            s = {k: np.asarray(v)[:width] for k, v in self.stats.stats["sensor"].items()}
        else:
            if key not in self.stats.stats:
                self.check_keys([key])
            s = self.stats.stats[key]
        mode = self.modes.get(key, self.mode)
        if mode == "none":
            return np.zeros_like(s["mean"]), np.ones_like(s["mean"])
        if mode == "mean_std":
            return s["mean"], np.maximum(s["std"], EPS)
        return (s["q99"] + s["q01"]) / 2, np.maximum((s["q99"] - s["q01"]) / 2, EPS)

    def _check_width(self, key: str, x) -> None:
        if key == WRENCH:
            width = len(self.stats.stats["sensor"]["mean"])
            if x.shape[-1] > width:
                raise NormalizationError(
                    f"the wrench has {x.shape[-1]} channels but the sensor stats only {width}; the data "
                    "and the checkpoint's stats disagree"
                )
            return
        width = len(self.stats.stats[key]["mean"]) if key in self.stats.stats else None
        if width is not None and x.shape[-1] != width:
            raise NormalizationError(
                f"{key} has {x.shape[-1]} channels but the stats have {width}; the data "
                "and the checkpoint's stats disagree"
            )

    def normalize(self, key: str, x):
        """`x` (..., width) in physical units -> normalized (sensor transform first, for the sensor)."""
        shift, scale = self._params(key, x)
        self._check_width(key, x)
        tf = self.stats.sensor_transform
        if key in ("sensor", WRENCH) and not tf.identity:
            x = (tf if key == "sensor" else tf.leading(x.shape[-1]))(x)
        log_scale = self.stats.stats.get(key, {}).get("log_scale")
        if log_scale is not None:  # a declared stream's transform=signed_log1p
            x = signed_log1p(x, log_scale if isinstance(x, np.ndarray | np.generic) else scale.new_tensor(log_scale))
        return (x - shift) / scale

    def unnormalize(self, key: str, x):
        """Inverse of the affine part; for the wrench also of the sensor transform's log (the wrench output is
        reported in physical units). A clip is never inverted, nor the sensor's transform."""
        shift, scale = self._params(key, x)
        self._check_width(key, x)
        x = x * scale + shift
        if key == WRENCH and not self.stats.sensor_transform.identity:
            x = self.stats.sensor_transform.leading(x.shape[-1]).invert(x)
        return x
