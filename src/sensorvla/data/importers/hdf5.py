"""Importer (and writer) for plain HDF5 episodes, the layout documented in docs/hdf5-format.md.

One episode per file (streams at the file root) or many per file (`/episodes/<name>/` groups). Each stream
is a group with `timestamps` (N,) and `data` (N, ...) and an optional `clock_offset` attribute.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.importers._common import (
    SENSOR_CONFIG_FIX,
    ImageSize,
    check_one_sensor_setting,
    resize_frames,
    select_views,
    size_hw,
)
from sensorvla.data.importers.base import ImportSource, run_import
from sensorvla.data.types import DataError, EpisodeData, Stream, as_data_error, check_increasing, median_rate
from sensorvla.data.writer import check_finite
from sensorvla.io import atomic_file

logger = logging.getLogger(__name__)

H5_SUFFIXES = {".h5", ".hdf5", ".hdf"}
REQUIRED_STREAMS = ("action", "state")
# the DataError (message, fix) when no episode has a camera view
NO_VIEWS = (
    "no camera views (/images/<view>/) in any episode",
    "write at least one /images/<view>/{timestamps,data} group per episode",
)


@dataclass
class H5Episode:
    """One episode found by `scan_hdf5`: the file, the group inside it and what its shapes declare."""

    file: Path
    group: str  # "/" or "/episodes/<name>"
    name: str
    views: list[str] = field(default_factory=list)
    action_fps: float | None = None
    force_channels: int | None = None
    sensor_rate: float | None = None


def _h5py():
    import h5py

    return h5py


def _fix_file(what: str = "") -> str:
    return (what or "re-export the episode (see docs/hdf5-format.md)") + ", or move the file out of the source folder"


def find_hdf5_files(src: str | Path) -> list[Path]:
    """`src` itself when it is a file, else every *.h5 / *.hdf5 / *.hdf under it (sorted)."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError("source does not exist", path=str(src), fix="pass an .h5 file or a folder of them")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in H5_SUFFIXES)
    if not files:
        raise DataError(
            "no .h5/.hdf5 files found",
            path=str(src),
            fix="pass a folder of HDF5 episodes (docs/hdf5-format.md) or one file",
        )
    return files


def _open(path: Path):
    h5py = _h5py()
    fix = _fix_file("the file is corrupt or not HDF5; re-export it")
    with as_data_error((OSError, ValueError), lambda e: f"cannot open the HDF5 file ({e})", path=path, fix=fix):
        return h5py.File(path, "r")


def _declared_len(g, name: str, file: Path) -> tuple[int, tuple[int, ...]]:
    """(len(timestamps), data.shape) of stream group `g` from the shapes only; checks they agree."""
    for part in ("timestamps", "data"):
        if part not in g:
            raise DataError(f"{g.name}/{part} is missing", episode=name, path=str(file), fix=_fix_file())
    n_ts, shape = g["timestamps"].shape, g["data"].shape
    if len(n_ts) != 1:
        raise DataError(
            f"{g.name}/timestamps has shape {n_ts}, expected (N,)",
            episode=name,
            path=str(file),
            fix=_fix_file(),
        )
    if not shape or shape[0] != n_ts[0]:
        raise DataError(
            f"{g.name} has {n_ts[0]} timestamps but data of shape {shape} (truncated array?)",
            episode=name,
            path=str(file),
            fix=_fix_file(),
        )
    return n_ts[0], shape


def _median_rate(g) -> float | None:
    """1 / median step of a stream group's timestamps (None when it cannot be told)."""
    try:
        ts = g["timestamps"][()]
    except (OSError, ValueError):
        return None  # reported with the file and dataset when the episode is read
    return median_rate(ts)


def scan_hdf5(src: str | Path, views: Sequence[str] | None = None) -> list[H5Episode]:
    """Open every file and check the layout from shapes and attributes only (no arrays read).

    Raises DataError before anything is written on a missing/corrupt file, a missing stream, mismatched
    lengths, or a view that some episodes lack.
    """
    episodes: list[H5Episode] = []
    for path in find_hdf5_files(src):
        with _open(path) as f:
            if "episodes" in f:
                groups = [(f"/episodes/{k}", f"{path.stem}/{k}") for k in sorted(f["episodes"])]
            else:
                groups = [("/", path.stem)]
            for gname, name in groups:
                g = f[gname]
                for s in REQUIRED_STREAMS:
                    if s not in g:
                        raise DataError(
                            f"stream group {gname.rstrip('/')}/{s} is missing",
                            episode=name,
                            path=str(path),
                            fix=_fix_file(f"write /{s}/timestamps and /{s}/data"),
                        )
                    _declared_len(g[s], name, path)
                ep = H5Episode(path, gname, name, sorted(g["images"]) if "images" in g else [])
                for v in ep.views:
                    _declared_len(g["images"][v], name, path)
                if "sensor" in g:
                    _declared_len(g["sensor"], name, path)
                    ep.force_channels = int(g["sensor"].attrs.get("force_channels", 1))
                    rate = g["sensor"].attrs.get("rate")
                    ep.sensor_rate = float(rate) if rate is not None else _median_rate(g["sensor"])
                fps = g.attrs.get("action_fps", f.attrs.get("action_fps"))
                ep.action_fps = float(fps) if fps is not None else _median_rate(g["action"])
                episodes.append(ep)
    select_views(episodes, views, src=src, images_of=lambda e: e.file, none_found=NO_VIEWS)
    fc = {e.force_channels for e in episodes if e.force_channels is not None}
    check_one_sensor_setting(fc, "episodes declare different sensor force_channels", src)
    return episodes


def _read(g, part: str, name: str, file: Path) -> np.ndarray:
    with as_data_error(
        (OSError, ValueError, KeyError),
        lambda e: f"cannot read {g.name}/{part} ({e})",
        episode=name,
        path=file,
        fix=_fix_file("the file is corrupt; re-export it"),
    ):
        return np.asarray(g[part][()])


def _read_stream(g, name: str, file: Path, *, ndim: int, dtype=None) -> Stream:
    """Stream group `g`: its timestamps, data (checked: one row per timestamp, `ndim` dimensions; cast to `dtype`
    when given) and clock offset."""
    ts = _read(g, "timestamps", name, file).astype(np.float64)
    data = _read(g, "data", name, file)
    if len(ts) != len(data):
        raise DataError(
            f"{g.name} has {len(ts)} timestamps but {len(data)} rows (truncated array?)",
            episode=name,
            path=str(file),
            fix=_fix_file(),
        )
    if data.ndim != ndim:
        raise DataError(
            f"{g.name}/data has shape {data.shape}, expected {ndim} dimensions",
            episode=name,
            path=str(file),
            fix="see docs/hdf5-format.md for each stream's shape",
        )
    check_increasing(ts, what=g.name, episode=name, path=file)
    return Stream(ts, data if dtype is None else data.astype(dtype), float(g.attrs.get("clock_offset", 0.0)))


def load_hdf5_episode(
    ep: H5Episode,
    *,
    instruction: str | None = None,
    image_size: ImageSize = None,
) -> EpisodeData:
    """Read one episode group into EpisodeData (images resized to `image_size` when given)."""
    hw = size_hw(image_size)
    name, file = ep.name, ep.file
    with _open(file) as f:
        g = f[ep.group]
        text = instruction or g.attrs.get("instruction", f.attrs.get("instruction"))
        if isinstance(text, bytes):
            text = text.decode()
        if not text:
            raise DataError(
                "no instruction attribute",
                episode=name,
                path=str(file),
                fix="set the group's `instruction` attribute or pass instruction=... (--instruction)",
            )
        streams = {
            "action": _read_stream(g["action"], name, file, ndim=2, dtype=np.float32),
            "state": _read_stream(g["state"], name, file, ndim=2, dtype=np.float32),
        }
        for v in ep.views:
            ts, frames, offset = _read_stream(g["images"][v], name, file, ndim=4)
            if frames.dtype != np.uint8 or frames.shape[-1] != 3:
                raise DataError(
                    f"/images/{v}/data is {frames.dtype} {frames.shape}, expected uint8 (N, h, w, 3)",
                    episode=name,
                    path=str(file),
                    fix="store RGB frames as uint8",
                )
            streams[f"image.{v}"] = Stream(ts, resize_frames(frames, hw), offset)
        if "sensor" in g:
            streams["sensor"] = _read_stream(g["sensor"], name, file, ndim=2, dtype=np.float32)
            check_finite(
                streams["sensor"].values,
                episode=name,
                stream="/sensor/data",
                path=str(file),
                fix="clean the sensor stream, or delete the /sensor group to import without sensor",
            )
        try:
            extra = json.loads(g.attrs.get("extra", "{}"))
        except (TypeError, json.JSONDecodeError):
            extra = {}
    extra = {**(extra if isinstance(extra, dict) else {}), "source": "hdf5", "source_path": str(file)}
    return EpisodeData.from_streams(name, str(text), streams, extra)


def _consistent(values: list[float], what: str, src: Path, fix: str) -> float | None:
    if not values:
        return None
    if max(values) - min(values) > 0.02 * max(abs(v) for v in values):  # inferred rates jitter a little
        raise DataError(f"episodes have different {what} {sorted(set(values))}", path=str(src), fix=fix)
    return values[0]


def scan_hdf5_source(
    src: str | Path,
    *,
    views: Sequence[str] | None = None,
    instruction: str | None = None,
    image_size: ImageSize = None,
) -> ImportSource:
    """The HDF5 episodes under `src` as an import source (layout checked, rates inferred; no arrays read)."""
    src = Path(src)
    episodes = scan_hdf5(src, views)
    fps = _consistent(
        [e.action_fps for e in episodes if e.action_fps],
        "action_fps",
        src,
        "resample to one action rate, or set the file attribute action_fps",
    )
    if fps is None:
        raise DataError(
            "cannot tell the action rate", path=str(src), fix="set the file attribute action_fps (e.g. 10.0)"
        )
    rate = _consistent([e.sensor_rate for e in episodes if e.sensor_rate], "sensor rate", src, SENSOR_CONFIG_FIX)
    info: dict[str, Any] = {"force_channels": next((e.force_channels for e in episodes if e.force_channels), 1)}
    if rate is not None:
        info["sensor_rate"] = rate
    return ImportSource(
        kind="hdf5",
        items=episodes,
        loader=lambda e: load_hdf5_episode(e, instruction=instruction, image_size=image_size),
        action_fps=fps,
        default_id=f"hdf5_{src.stem}",
        info=info,
    )


def import_hdf5(src: str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Convert HDF5 episodes (docs/hdf5-format.md) into a sensorvla dataset at `out_dir` (`run_import`).

    Args:
        src: one .h5 file or a folder of them.
        out_dir: the dataset to create.
        options: `dataset_id` (default "hdf5_<src stem>"), `progress`, and the `ImportOptions` (`instruction`
            overrides every episode's `instruction` attribute; `image_size` None keeps the stored size).
    """
    return run_import(scan_hdf5_source, src, out_dir, **options)


# --- writing --------------------------------------------------------------------------------------------
def _write_group(g, ep: EpisodeData, *, force_channels: int, sensor_rate: float | None) -> None:
    g.attrs["instruction"] = ep.instruction
    g.attrs["extra"] = json.dumps(ep.extra, default=str)
    off = ep.clock_offsets

    def stream(sub, ts, data, key, **kw):
        sub.create_dataset("timestamps", data=np.asarray(ts, np.float64))
        sub.create_dataset("data", data=np.asarray(data), **kw)
        sub.attrs["clock_offset"] = float(off.get(key, 0.0))

    stream(g.create_group("action"), ep.action_timestamps, np.asarray(ep.actions, np.float32), "action")
    stream(g.create_group("state"), ep.state_timestamps, np.asarray(ep.state, np.float32), "state")
    imgs = g.create_group("images")
    for v, s in ep.images.items():
        stream(
            imgs.create_group(v),
            s.timestamps,
            np.asarray(s.frames, np.uint8),
            f"image.{v}",
            compression="gzip",
        )
    if ep.sensor is not None:
        sg = g.create_group("sensor")
        stream(sg, ep.sensor_timestamps, np.asarray(ep.sensor, np.float32), "sensor")
        sg.attrs["force_channels"] = int(force_channels)
        if sensor_rate:
            sg.attrs["rate"] = float(sensor_rate)


def write_hdf5(
    path: str | Path,
    episodes: EpisodeData | Sequence[EpisodeData],
    *,
    action_fps: float,
    force_channels: int = 1,
    sensor_rate: float | None = None,
) -> Path:
    """Write episodes in the documented layout, atomically (temp file + rename).

    A single EpisodeData is written at the file root; a sequence goes to /episodes/<name> groups ("/" in a
    name becomes "__").
    """
    h5py = _h5py()
    path = Path(path)
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = "sensorvla-hdf5-episode/1"
        f.attrs["action_fps"] = float(action_fps)
        if isinstance(episodes, EpisodeData):
            _write_group(f, episodes, force_channels=force_channels, sensor_rate=sensor_rate)
        else:
            root = f.create_group("episodes")
            for ep in episodes:
                _write_group(
                    root.create_group(ep.name.replace("/", "__")),
                    ep,
                    force_channels=force_channels,
                    sensor_rate=sensor_rate,
                )
    return path
