"""The sidecar: streams at their own rate and on their own clock, beside a LeRobot v3 dataset.

Declared in meta/info.json under "sensorvla" -> "streams" -> <key> (LeRobot ignores the key):
    {"kind": "values" | "timing" | "frames", "shape": [...], "dtype": "float32", "rate_hz": 650.0,
     "path": "streams/<key>/chunk-{chunk_index:03d}/episode_{episode_index:06d}",
     "index": "streams/<key>/episodes.parquet", ...}  (+ e.g. "force_channels", "names")
Per episode: `<path>.timestamps.npy` (N,) float64 seconds on the stream's own clock and, for "values" and
"frames", `<path>.values.npy` (N, *shape); both memory-mappable, never pickled. The index holds one row per
episode that has the stream: episode_index, num_samples, clock_offset_s (added to the timestamps to reach
the dataset's clock), t_first, t_last, episode_length (the episode's frame count when the stream was written:
a dataset whose episodes were deleted or renumbered since is refused). Episodes without a row have no data for
that stream (sensor-less; a warning names them).

Kinds: "values" (a sensor, the full-rate state), "timing" (the capture time of each video frame, or the
true time of each action row), "frames" (raw uint8 camera frames, the lossless option).

Stream keys are identifiers (`sensorvla.io.check_name`); every `path` / `index` an info.json declares is
resolved inside the dataset folder (`inside_dataset`), so a declaration can never read or write elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.types import DataError, Stream, check_increasing, median_rate
from sensorvla.io import UnsafePathError, check_name, resolve_inside

logger = logging.getLogger(__name__)

STREAMS_DIR = "streams"
PATH_TEMPLATE = STREAMS_DIR + "/{key}/chunk-{chunk_index:03d}/episode_{episode_index:06d}"
INDEX_TEMPLATE = STREAMS_DIR + "/{key}/episodes.parquet"
CHUNK_SIZE = 1000  # episodes per chunk folder, as LeRobot's chunks_size
KINDS = ("values", "timing", "frames")
RATE_TOLERANCE = 0.25  # relative: an episode's median sample interval vs the declared rate_hz (x10 or ms are far off)
NPY_FIX = (
    "the file is truncated or damaged: re-create the dataset or re-attach the stream (`sensorvla data add-sensor`)"
)


def inside_dataset(root: Path, rel: str, what: str, path: str | Path | None = None) -> Path:
    """`root / rel`, refused with a DataError unless it resolves inside the dataset folder `root`."""
    try:
        return resolve_inside(root, rel, what)
    except UnsafePathError as e:
        raise DataError(
            f"{e}: a dataset reads and writes only inside its folder",
            path=str(path or Path(root) / "meta" / "info.json"),
            fix="declare paths relative to the dataset folder, without '..' (re-attach the stream with "
            "`sensorvla data add-sensor --overwrite`)",
        ) from e


def stream_key(key: str, path: str | Path) -> str:
    """`key` when it is a valid stream name (an identifier); DataError naming what is allowed otherwise."""
    try:
        return check_name(key, "stream name")
    except UnsafePathError as e:
        raise DataError(str(e), path=str(path), fix="name streams with letters, digits, '_', '.', '-'") from e


def open_npy(path: Path, *, episode: str | None = None, rows: int | None = None, mmap: bool = True) -> np.ndarray:
    """np.load (memory-mapped) with a DataError naming the file and the fix for missing/truncated files."""
    if not path.is_file():
        raise DataError("file is missing", episode=episode, path=str(path), fix=NPY_FIX)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(
            f"cannot read the array (truncated? {type(e).__name__}: {e})", episode=episode, path=str(path), fix=NPY_FIX
        ) from e
    if rows is not None and len(arr) != rows:
        raise DataError(
            f"array has {len(arr)} rows, the stream index says {rows} (truncated?)",
            episode=episode,
            path=str(path),
            fix=NPY_FIX,
        )
    return arr


@dataclass
class SidecarStream:
    """Read side of one declared stream."""

    root: Path
    key: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    rate_hz: float | None
    path: str
    extra: dict[str, Any] = field(default_factory=dict)
    index: dict[int, dict[str, Any]] = field(default_factory=dict)  # episode_index -> index row
    checked: set[int] = field(default_factory=set, repr=False)  # episodes whose timestamps passed their check

    @property
    def episodes(self) -> list[int]:
        """The episode indices the stream has samples for."""
        return sorted(self.index)

    def has(self, e: int) -> bool:
        """True when the stream has samples for episode `e`."""
        return e in self.index

    def offset(self, e: int) -> float:
        """Seconds added to episode `e`'s stream timestamps to reach the dataset clock."""
        return float(self.index[e]["clock_offset_s"])

    def files(self, e: int) -> tuple[Path, Path]:
        """(timestamps .npy, values .npy) files of episode `e`."""
        try:
            rel = self.path.format(key=self.key, chunk_index=e // CHUNK_SIZE, episode_index=e)
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise DataError(
                f"stream {self.key!r} declares the path template {self.path!r}, which cannot be filled ({err!r})",
                path=str(self.root / "meta" / "info.json"),
                fix=f"declare it as {PATH_TEMPLATE.replace('{key}', self.key)!r}",
            ) from err
        what = f"stream {self.key!r} path"
        return (
            inside_dataset(self.root, rel + ".timestamps.npy", what),
            inside_dataset(self.root, rel + ".values.npy", what),
        )

    def timestamps(self, e: int, name: str | None = None) -> np.ndarray:
        """(N,) float64 on the stream's own clock (memory-mapped), checked on the first read of each episode:
        finite, strictly increasing (non-decreasing for a video's capture times, where a held frame repeats) and
        at the declared `rate_hz` within RATE_TOLERANCE."""
        ts = open_npy(self.files(e)[0], episode=name, rows=int(self.index[e]["num_samples"]))
        if e not in self.checked:
            self.check_timestamps(ts, e, name)
            self.checked.add(e)
        return ts

    def check_timestamps(self, ts: np.ndarray, e: int, name: str | None = None) -> None:
        """DataError naming the file, the episode, the sample and the fix unless `ts` is a valid clock."""
        path = str(self.files(e)[0])
        fix = f"re-attach it with timestamps in seconds (`sensorvla data add-sensor --name {self.key} --overwrite`)"
        held = self.kind == "timing" and self.key != "action"  # a video's capture time repeats for a held frame
        check_increasing(ts, what=f"stream {self.key!r}", episode=name, path=path, fix=fix, strict=not held)
        if held or not self.rate_hz or len(ts) < 3:
            return
        measured = median_rate(ts)
        rate = float(self.rate_hz)
        if abs(measured - rate) > RATE_TOLERANCE * rate:
            ratio = rate / measured
            unit = " (timestamps in milliseconds? they must be in seconds)" if 500 < ratio < 2000 else ""
            raise DataError(
                f"stream {self.key!r} timestamps run at {measured:.6g} Hz, meta/info.json declares rate_hz "
                f"{rate:g}{unit}",
                episode=name,
                path=path,
                fix=f"fix rate_hz in meta/info.json, or {fix}",
            )

    def values(self, e: int, name: str | None = None) -> np.ndarray:
        """(N, *shape) memory-mapped values ("values" and "frames" kinds)."""
        arr = open_npy(self.files(e)[1], episode=name, rows=int(self.index[e]["num_samples"]))
        if tuple(arr.shape[1:]) != tuple(self.shape):
            raise DataError(
                f"stream {self.key!r} values have shape {arr.shape}, info.json declares (N, {list(self.shape)})",
                episode=name,
                path=str(self.files(e)[1]),
                fix=NPY_FIX,
            )
        return arr

    def stream(self, e: int, name: str | None = None) -> Stream:
        """Episode `e` of this stream: its timestamps, values and clock offset."""
        return Stream(self.timestamps(e, name), self.values(e, name), self.offset(e))

    def spec(self) -> dict[str, Any]:
        """The stream's declaration for meta/info.json."""
        return _spec(self.key, self.kind, self.shape, self.dtype, self.rate_hz, self.extra)


def _spec(key, kind, shape, dtype, rate_hz, extra) -> dict[str, Any]:
    return {
        "kind": kind,
        "shape": [int(x) for x in shape],
        "dtype": str(dtype),
        "rate_hz": None if rate_hz is None else float(rate_hz),
        "path": PATH_TEMPLATE.replace("{key}", key),
        "index": INDEX_TEMPLATE.format(key=key),
        **extra,
    }


def episode_span(rows: list[dict[str, Any]], fps: float, action: SidecarStream | None, e: int) -> tuple[float, float]:
    """[first, last] action-row time of episode e on the dataset clock."""
    if action is not None and action.has(e):
        r = action.index[e]
        return float(r["t_first"]) + action.offset(e), float(r["t_last"]) + action.offset(e)
    return 0.0, (int(rows[e]["length"]) - 1) / fps


def _check_episode_lengths(root: Path, key: str, s: SidecarStream, rows: list[dict[str, Any]]) -> None:
    """DataError when an episode's frame count differs from the one recorded when the stream was written."""
    for e, r in sorted(s.index.items()):
        recorded = r.get("episode_length")
        if recorded is not None and int(recorded) != int(rows[e]["length"]):
            raise DataError(
                f"sidecar stream {key!r} was written for an episode {e} of {int(recorded)} frames, the dataset's "
                f"episode {e} has {int(rows[e]['length'])}: episodes were deleted, reordered or re-recorded since "
                "(LeRobot's delete_episodes renumbers episodes and drops the sidecar)",
                episode=rows[e].get("name", f"episode_{e:06d}"),
                path=str(root / INDEX_TEMPLATE.format(key=key)),
                fix=f"re-attach the stream to the dataset as it is now (`sensorvla data add-sensor --name {key} "
                "--overwrite`), or re-create the dataset",
            )


_WARNED: set[tuple[str, str, int]] = set()


def _warn_uncovered(root: Path, key: str, s: SidecarStream, rows: list[dict[str, Any]]) -> None:
    """A warning (once per dataset and process) naming the episodes that have no samples of stream `key`."""
    missing = [e for e in range(len(rows)) if not s.has(e)]
    tag = (str(Path(root).resolve()), key, len(missing))
    if not missing or tag in _WARNED:
        return
    _WARNED.add(tag)
    logger.warning(
        "%s: %d of %d episodes have no %r samples (episodes %s%s): they train with the %s masked. If the "
        "episodes were edited with LeRobot's tools (which drop the sidecar), re-attach it: `sensorvla data "
        "add-sensor --dataset %s --name %s --overwrite`",
        root,
        len(missing),
        len(rows),
        key,
        missing[:20],
        " ..." if len(missing) > 20 else "",
        key,
        root,
        key,
    )


def undeclared_streams(root: Path, info: dict[str, Any]) -> list[str]:
    """Folders under streams/ holding an index that meta/info.json does not declare (its sensorvla key was lost)."""
    declared = set((info.get("sensorvla", {}) or {}).get("streams", {}) or {})
    folder = Path(root) / STREAMS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "episodes.parquet").is_file() and p.name not in declared)


def load_streams(root: Path, info: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, SidecarStream]:
    """Every declared stream with its index, checked against the episodes (ids, clocks); no array is read."""
    import pyarrow.parquet as pq

    declared = info.get("sensorvla", {}).get("streams", {}) or {}
    lost = undeclared_streams(root, info)
    if lost and not declared:
        logger.warning(
            "%s holds sidecar streams %s that meta/info.json does not declare (its 'sensorvla' key is gone: LeRobot's "
            "tools rewrite info.json without it), so they are NOT used. Re-attach them (`sensorvla data add-sensor "
            "--overwrite`) if the episodes are unchanged",
            root / STREAMS_DIR,
            lost,
        )
    out: dict[str, SidecarStream] = {}
    info_path = str(root / "meta" / "info.json")
    for key, spec in declared.items():
        stream_key(key, info_path)
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            raise DataError(
                f"sidecar stream {key!r} is declared as {spec!r}; expected a kind of {KINDS}",
                path=info_path,
                fix="fix the declaration in meta/info.json or re-attach the stream",
            )
        index_rel = str(spec.get("index", INDEX_TEMPLATE.format(key=key)))
        index_path = inside_dataset(root, index_rel, f"stream {key!r} index")
        if not index_path.is_file():
            raise DataError(
                f"sidecar stream {key!r} is declared but its index is missing",
                path=str(index_path),
                fix=f"re-attach it (`sensorvla data add-sensor --name {key} --overwrite`) or remove it from info.json",
            )
        table = pq.read_table(index_path).to_pylist()
        extra = {k: v for k, v in spec.items() if k not in ("kind", "shape", "dtype", "rate_hz", "path", "index")}
        s = SidecarStream(
            root=root,
            key=key,
            kind=spec["kind"],
            shape=tuple(spec.get("shape", ())),
            dtype=spec.get("dtype", "float32"),
            rate_hz=spec.get("rate_hz"),
            path=str(spec.get("path", PATH_TEMPLATE.replace("{key}", key))),
            extra=extra,
            index={int(r["episode_index"]): r for r in table},
        )
        out[key] = s
    fps = float(info["fps"])
    action = out.get("action")
    for key, s in out.items():
        bad = sorted(e for e in s.index if not 0 <= e < len(rows))
        if bad:
            raise DataError(
                f"sidecar stream {key!r} has episode_index {bad[:5]} but the dataset has episodes 0..{len(rows) - 1}",
                path=str(root / INDEX_TEMPLATE.format(key=key)),
                fix="attach the stream to the dataset it was recorded with (`sensorvla data add-sensor --overwrite`)",
            )
        _check_episode_lengths(root, key, s, rows)
        if key == "action" or s.kind != "values":
            continue
        _warn_uncovered(root, key, s, rows)
        for e, r in s.index.items():
            lo, hi = episode_span(rows, fps, action, e)
            t0, t1 = float(r["t_first"]) + s.offset(e), float(r["t_last"]) + s.offset(e)
            if t1 < lo - 1.0 or t0 > hi + 1.0:
                raise DataError(
                    f"sidecar stream {key!r} covers {t0:.3f}..{t1:.3f} s on the dataset clock, the episode "
                    f"{lo:.3f}..{hi:.3f} s: the clocks do not match",
                    episode=rows[e].get("name", f"episode_{e:06d}"),
                    path=str(root / INDEX_TEMPLATE.format(key=key)),
                    fix=f"re-attach it with the right offset (`sensorvla data add-sensor --clock-offset "
                    f"{lo - float(r['t_first']):.6f} --overwrite`)",
                )
    return out


class StreamWriter:
    """Write one stream's per-episode arrays and its index into a dataset folder being built."""

    def __init__(
        self, root: Path, key: str, kind: str, *, rate_hz: float | None = None, folder: Path | None = None, **extra
    ):
        """`folder`: where `streams/<key>/` goes (default under `root`; add-sensor builds it in a temp folder)."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: choose one of {KINDS}")
        self.root, self.key, self.kind, self.rate_hz, self.extra = Path(root), key, kind, rate_hz, extra
        stream_key(key, self.root)
        self.folder = Path(folder) if folder is not None else inside_dataset(self.root, f"{STREAMS_DIR}/{key}", key)
        self.shape: tuple[int, ...] | None = () if kind == "timing" else None
        self.dtype = "float64" if kind == "timing" else None
        self.rows: list[dict[str, Any]] = []
        self.nbytes = 0

    def add(self, e: int, timestamps: np.ndarray, values: np.ndarray | None, clock_offset: float) -> None:
        """Store episode e: timestamps (N,) own clock, values (N, *shape) (None for "timing")."""
        ts = np.ascontiguousarray(timestamps, dtype=np.float64)
        stem = self.folder / f"chunk-{e // CHUNK_SIZE:03d}" / f"episode_{e:06d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        np.save(stem.with_name(stem.name + ".timestamps.npy"), ts, allow_pickle=False)
        self.nbytes += ts.nbytes
        if self.kind != "timing":
            arr = np.ascontiguousarray(values)
            if self.shape is None:
                self.shape, self.dtype = tuple(arr.shape[1:]), str(arr.dtype)
            elif tuple(arr.shape[1:]) != self.shape:
                raise DataError(
                    f"stream {self.key!r} has rows of shape {arr.shape[1:]}, earlier episodes {self.shape}",
                    path=str(stem),
                    fix="use one configuration per stream and dataset",
                )
            np.save(stem.with_name(stem.name + ".values.npy"), arr.astype(self.dtype, copy=False), allow_pickle=False)
            self.nbytes += arr.nbytes
        self.rows.append(
            {
                "episode_index": int(e),
                "num_samples": len(ts),
                "clock_offset_s": float(clock_offset),
                "t_first": float(ts[0]) if len(ts) else 0.0,
                "t_last": float(ts[-1]) if len(ts) else 0.0,
            }
        )

    def finish(self, lengths: dict[int, int] | None = None) -> dict[str, Any] | None:
        """Write the index; returns the info.json declaration (None when no episode had the stream).

        `lengths`: each episode's frame count in the dataset, kept in the index (`episode_length`) so that a
        reader notices episodes deleted or renumbered since (LeRobot's `delete_episodes` drops the sidecar).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return None
        if lengths is not None:
            for r in self.rows:
                r["episode_length"] = int(lengths[r["episode_index"]])
        path = self.folder / "episodes.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows), path)
        return _spec(self.key, self.kind, self.shape or (), self.dtype, self.rate_hz, self.extra)
