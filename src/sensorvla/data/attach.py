"""`sensorvla data add-sensor`: attach a sensor stream (own rate, own clock) to an existing LeRobot v3
dataset, in place and atomically: the stream is built in a temp folder, swapped in, then declared in
meta/info.json. Nothing of LeRobot's changes, so LeRobot still opens the dataset.

Source files hold, for each sample, the episode index, a timestamp on the sensor's clock and the values:
    CSV   header row; columns `episode_index`, `timestamp` (or `t`, `time`), then one column per channel
    NPZ   arrays `episode_index` (N,), `timestamps` (N,), `values` (N, C)   (never unpickled)
    HDF5  datasets `episode_index`, `timestamps`, `values` at the root, or groups
          `/episodes/<episode_index>/{timestamps,values}`
A file without episode indices is one episode: name it with `episode=` (`--episode`).
`clock_offset` (seconds) is added to the timestamps to reach the dataset's clock (an episode's frame i is
at frame_index / fps); see docs/data-format.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.format import load_meta
from sensorvla.data.importers._common import read_numeric_csv
from sensorvla.data.layout import INFO_FILE
from sensorvla.data.options import AttachOptions
from sensorvla.data.sidecar import STREAMS_DIR, StreamWriter, episode_span, inside_dataset, stream_key
from sensorvla.data.types import DataError, as_data_error, check_increasing, error_text, median_rate
from sensorvla.data.writer import check_finite
from sensorvla.io import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)

TS_NAMES = ("timestamp", "timestamps", "t", "time", "timestamp_s")
RATE_TOLERANCE = 0.05  # relative: per-episode rates must agree with each other and with --rate


def _by_episode(src: Path, ep_idx, ts, values, episode: int | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    ts = np.asarray(ts, np.float64)
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or len(values) != len(ts):
        raise DataError(
            f"{len(ts)} timestamps but values of shape {values.shape}; expected (N, C)",
            path=str(src),
            fix="write one row of C values per timestamp",
        )
    if ep_idx is None:
        if episode is None:
            raise DataError(
                "the file has no episode_index column",
                path=str(src),
                fix="add an episode_index column, or name the episode it belongs to (--episode N)",
            )
        ep_idx = np.full(len(ts), episode)
    ep_idx = np.asarray(ep_idx)
    if not np.issubdtype(ep_idx.dtype, np.number) or not np.all(np.equal(np.mod(ep_idx, 1), 0)):
        raise DataError("episode_index must be integers", path=str(src), fix="write 0-based episode numbers")
    ep_idx = ep_idx.astype(np.int64)
    out = {}
    for e in np.unique(ep_idx):
        rows = np.nonzero(ep_idx == e)[0]
        out[int(e)] = (ts[rows], values[rows])
    return out


def _read_csv(src: Path, episode: int | None):
    header, a = read_numeric_csv(src, what="CSV", fix="write a header row and one row of numbers per sample")
    ts_col = next((i for i, h in enumerate(header) if h.lower() in TS_NAMES), None)
    if ts_col is None:
        raise DataError(
            f"CSV header {header} has no timestamp column",
            path=str(src),
            fix=f"name the time column one of {list(TS_NAMES)}",
        )
    if not len(a):
        raise DataError("CSV has no samples", path=str(src), fix="write one row per sample")
    ep_col = header.index("episode_index") if "episode_index" in header else None
    value_cols = [i for i in range(len(header)) if i not in (ts_col, ep_col)]
    names = [header[i] for i in value_cols]
    ep = a[:, ep_col] if ep_col is not None else None
    return _by_episode(src, ep, a[:, ts_col], a[:, value_cols], episode), names


def _read_npz(src: Path, episode: int | None):
    with (
        as_data_error(
            (OSError, ValueError, EOFError),
            lambda e: f"cannot read the npz ({error_text(e)}; pickled arrays are refused)",
            path=src,
            fix="re-export it with numeric arrays",
        ),
        np.load(src, allow_pickle=False) as z,
    ):
        keys = set(z.files)
        if not {"timestamps", "values"} <= keys:
            raise DataError(
                f"npz has arrays {sorted(keys)}, expected 'timestamps' and 'values' (+ 'episode_index')",
                path=str(src),
                fix="np.savez(path, episode_index=..., timestamps=..., values=...)",
            )
        ep = z["episode_index"] if "episode_index" in keys else None
        return _by_episode(src, ep, z["timestamps"], z["values"], episode), None


def _read_h5(src: Path, episode: int | None):
    import h5py

    unreadable = (OSError, KeyError, ValueError)
    with (
        as_data_error(unreadable, lambda e: f"cannot read the HDF5 file ({e})", path=src, fix="re-export it"),
        h5py.File(src, "r") as f,
    ):
        if "episodes" in f:
            out = {}
            for k in sorted(f["episodes"], key=lambda x: int(x) if x.isdigit() else -1):
                if not k.isdigit():
                    raise DataError(
                        f"group /episodes/{k} is not an episode index",
                        path=str(src),
                        fix="name each group by its 0-based episode index",
                    )
                g = f["episodes"][k]
                out.update(_by_episode(src, None, g["timestamps"][()], g["values"][()], int(k)))
            return out, None
        for k in ("timestamps", "values"):
            if k not in f:
                raise DataError(
                    f"no /{k} dataset (found {sorted(f)})",
                    path=str(src),
                    fix="write /episode_index, /timestamps, /values or /episodes/<i>/{timestamps,values}",
                )
        ep = f["episode_index"][()] if "episode_index" in f else None
        return _by_episode(src, ep, f["timestamps"][()], f["values"][()], episode), None


def read_sensor_file(src: str | Path, episode: int | None = None):
    """{episode_index: (timestamps (N,), values (N, C))} and the channel names (CSV header) or None."""
    src = Path(src)
    if not src.is_file():
        raise DataError("sensor file does not exist", path=str(src), fix="pass --src with a CSV, NPZ or HDF5 file")
    suffix = src.suffix.lower()
    if suffix == ".csv":
        return _read_csv(src, episode)
    if suffix == ".npz":
        return _read_npz(src, episode)
    if suffix in (".h5", ".hdf5", ".hdf"):
        return _read_h5(src, episode)
    raise DataError(f"unknown sensor file type {suffix!r}", path=str(src), fix="use .csv, .npz or .h5")


def _check_name(meta, name: str, overwrite: bool, info_path: Path) -> None:
    """A new stream name: not a stream already (unless `overwrite`), not a LeRobot feature of the dataset."""
    stream_key(name, info_path)  # an identifier: `--name ../x` or an absolute path never leaves the dataset
    if name in meta.streams and not overwrite:
        raise DataError(
            f"the dataset already has a sidecar stream {name!r}",
            path=str(info_path),
            fix="pass --overwrite to replace it, or --name another",
        )
    if (
        name in meta.info["features"]
        or name in ("action", "observation.state")
        or name.startswith("observation.images")
    ):
        raise DataError(f"{name!r} is a LeRobot feature of the dataset", path=str(info_path), fix="pick another --name")


def _check_episode_samples(meta, e: int, ts, values, name: str, clock_offset: float, src) -> float | None:
    """Finite, strictly increasing samples that overlap episode `e`'s frames after the offset; their rate (Hz)."""
    ename = meta.episodes[e]["name"]
    check_finite(ts[:, None], episode=ename, stream=f"{name} timestamps", path=str(src), max_abs=None)
    check_finite(values, episode=ename, stream=name, path=str(src), fix="clean the sensor recording")
    check_increasing(ts, what=name, episode=ename, path=src, fix="sort the samples by time and drop duplicates")
    lo, hi = episode_span(meta.episodes, float(meta.info["fps"]), meta.streams.get("action"), e)
    t0, t1 = ts[0] + clock_offset, ts[-1] + clock_offset
    if t1 < lo or t0 > hi:
        raise DataError(
            f"with --clock-offset {clock_offset:g} the samples cover {t0:.3f}..{t1:.3f} s, the episode's frames "
            f"{lo:.3f}..{hi:.3f} s: the clocks do not match",
            episode=ename,
            path=str(src),
            fix=f"pass the offset from the sensor clock to the dataset clock, e.g. --clock-offset {lo - ts[0]:.6f} "
            "(if the sensor started with the episode)",
        )
    return median_rate(ts)


def _common_rate(meta, rates: dict[int, float], rate: float | None, src) -> float | None:
    """The median per-episode rate, after checking the episodes agree (and agree with `--rate` when given)."""
    measured = round(float(np.median(list(rates.values()))), 6) if rates else None
    off = {e: r for e, r in rates.items() if abs(r - measured) > RATE_TOLERANCE * measured}
    if off:
        e = next(iter(off))
        raise DataError(
            f"episode rates differ: {off[e]:.4g} Hz here, {measured:.4g} Hz in most episodes",
            episode=meta.episodes[e]["name"],
            path=str(src),
            fix="attach one sensor configuration per stream (resample, or split it with --name)",
        )
    if rate is not None and measured is not None and abs(rate - measured) > RATE_TOLERANCE * rate:
        raise DataError(
            f"--rate {rate:g} Hz, but the timestamps run at {measured:.4g} Hz",
            path=str(src),
            fix="check the timestamp unit (seconds) or pass the measured rate",
        )
    return measured


def _write_stream(root: Path, meta, name: str, per_episode: dict, rate_hz, clock_offset: float, extra: dict) -> dict:
    """Write the stream folder atomically, declare it in meta/info.json, drop stale norm stats; its declaration."""
    info_path = root / INFO_FILE
    stream_dir = inside_dataset(root, f"{STREAMS_DIR}/{name}", "--name")
    if stream_dir.exists() and name not in meta.streams:
        logger.warning(
            "replacing %s: a stream folder no dataset declaration points to (an interrupted add-sensor)", stream_dir
        )
    with atomic_dir(stream_dir) as tmp:
        w = StreamWriter(root, name, "values", rate_hz=rate_hz, folder=tmp, **extra)
        for e, (ts, values) in sorted(per_episode.items()):
            w.add(e, ts, values.astype(np.float32), clock_offset)
        spec = w.finish({e: int(r["length"]) for e, r in enumerate(meta.episodes)})
    info = json.loads(info_path.read_text())
    sv = info.setdefault("sensorvla", {})
    sv.setdefault("format", "sensorvla-sidecar/1")
    sv.setdefault("streams", {})[name] = spec
    atomic_write_json(info_path, info)
    stats = root / "meta" / "norm_stats.json"
    if stats.exists():
        stats.unlink()
        logger.warning("removed %s: computed without the new stream (training recomputes it)", stats)
    return spec


def add_sensor(dataset: str | Path, src: str | Path, **options: Any) -> dict:
    """Attach `src` as a sidecar stream of `dataset` (see the module docstring); returns its declaration.

    `options` are the `AttachOptions` keywords. Checks, before anything is written: episode indices exist;
    timestamps are finite and increase; values are finite; after `clock_offset` each episode's samples overlap
    that episode's frames (a wrong clock names the offset that would fit); the per-episode rates agree (and match
    `rate` when given).
    """
    o = AttachOptions(**options)
    root = Path(dataset)
    stream_key(o.name, "--name")  # before anything is read or written
    meta = load_meta(root)
    _check_name(meta, o.name, o.overwrite, root / INFO_FILE)
    per_episode, names = read_sensor_file(src, o.episode)
    n_eps = len(meta.episodes)
    bad = sorted(e for e in per_episode if not 0 <= e < n_eps)
    if bad:
        raise DataError(
            f"the sensor file has episode_index {bad[:5]}, the dataset has episodes 0..{n_eps - 1}",
            path=str(src),
            fix="number the sensor samples by the dataset's episode_index (meta/episodes), or attach it to the "
            "dataset it was recorded with",
        )
    channels = {v.shape[1] for _, v in per_episode.values()}
    if len(channels) > 1:
        raise DataError(f"episodes have different channel counts {sorted(channels)}", path=str(src), fix="one per file")
    rates = {}
    for e, (ts, values) in sorted(per_episode.items()):
        r = _check_episode_samples(meta, e, ts, values, o.name, o.clock_offset, src)
        if r is not None:
            rates[e] = r
    measured = _common_rate(meta, rates, o.rate, src)
    c = channels.pop()
    fc = c if o.force_channels is None else int(o.force_channels)
    if not 0 <= fc <= c:
        raise DataError(f"--force-channels {fc} is not within 0..{c}", path=str(src), fix=f"pass 0..{c}")
    missing = sorted(set(range(n_eps)) - set(per_episode))
    if missing:
        logger.warning("%d episode(s) have no %s samples (sensor-less, masked): %s", len(missing), o.name, missing[:10])
    extra = {
        "force_channels": fc,
        **({"names": names} if names else {}),
        **({"encoder": o.encoder} if o.encoder else {}),
    }
    spec = _write_stream(root, meta, o.name, per_episode, o.rate or measured, o.clock_offset, extra)
    logger.info("attached %s: %d episodes, %d channels, %.4g Hz", o.name, len(per_episode), c, o.rate or measured or 0)
    return spec
