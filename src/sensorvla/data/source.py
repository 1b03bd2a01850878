"""The one episode interface behind every data source, and the LeRobot v3 source (ours and lerobot's).

A source is `len(src)`, `src.name(i)` and `src.load(i) -> EpisodeData`: every stream with its own
timestamps and clock offset. The importers (HDF5, the original recorder) are sources that read files
into memory; `LeRobotSource` returns lazy arrays (memory-mapped sidecar streams, frames decoded from
video or PNG on access), so the same timeline and windowing code serves training and conversion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sensorvla.data.format import DatasetMeta, column_array, frame_features, load_meta, read_frames
from sensorvla.data.layout import ACTION_KEY, CAMERA_PREFIX, STATE_KEY
from sensorvla.data.sidecar import inside_dataset
from sensorvla.data.types import DataError, EpisodeData, Stream
from sensorvla.data.writer import check_finite

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE_S = 1e-4  # LeRobot's tolerance_s between a row timestamp and its video frame


@runtime_checkable
class EpisodeSource(Protocol):
    """Episodes readable one at a time."""

    def __len__(self) -> int: ...

    def name(self, i: int) -> str:
        """A readable name of episode `i`."""

    def load(self, i: int) -> EpisodeData:
        """Load episode `i` as EpisodeData."""


class ParquetImages:
    """`image`-dtype camera frames of one episode, PNG/JPEG bytes kept from the parquet; decoded on access."""

    dtype = np.dtype(np.uint8)

    def __init__(self, cells: list[dict[str, Any]], shape: tuple[int, int, int], root: Path, where: str):
        self.cells, self.root, self.where = cells, root, where
        self.shape = (len(cells), *shape)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, j: int) -> np.ndarray:
        import io

        from PIL import Image, UnidentifiedImageError

        cell = self.cells[int(j)] or {}
        data = cell.get("bytes")
        try:
            if data is None:
                if not cell.get("path"):
                    raise OSError("neither bytes nor a path")
                im = Image.open(inside_dataset(self.root, str(cell["path"]), f"image path of {self.where}"))
            else:
                im = Image.open(io.BytesIO(data))
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(
                f"cannot decode image {j} of {self.where} ({type(e).__name__}: {e})",
                path=self.where,
                fix="re-create the dataset; the embedded image is damaged",
            ) from e
        if arr.shape != self.shape[1:]:
            raise DataError(
                f"image {j} of {self.where} is {arr.shape}, info.json declares {self.shape[1:]}",
                path=self.where,
                fix="fix the feature's shape in meta/info.json",
            )
        return arr


@dataclass
class _Rows:
    """The per-frame columns of one episode that the reader needs (numpy, in memory)."""

    start: int
    stop: int


class LeRobotSource:
    """Episodes of a LeRobot v3 folder. Build it with `LeRobotSource.open(root)` (reads and checks meta/,
    the frame table and the video headers); `load(e)` is then cheap and lazy."""

    def __init__(self, meta: DatasetMeta, frames, rows: list[_Rows], tolerance_s: float, streams=()):
        self.meta, self.frames, self.rows, self.tolerance_s = meta, frames, rows, tolerance_s
        self.streams = meta.resolve_streams(streams)  # the declared sensor streams (`--data.streams`)
        n = frames.num_rows
        self.actions = column_array(frames, ACTION_KEY, meta.action_dim)
        self.row_time = np.asarray(frames.column("timestamp").to_numpy(), np.float64)
        self.index = np.asarray(frames.column("index").to_numpy(), np.int64)
        self.task_index = np.asarray(frames.column("task_index").to_numpy(), np.int64)
        has_state = STATE_KEY in frames.column_names
        self.state = column_array(frames, STATE_KEY, meta.state_dim) if has_state else np.zeros((n, 0), np.float32)
        frame_keys = [k for k in meta.sensor_keys if k not in meta.streams]
        self.frame_sensor = (
            np.concatenate([column_array(frames, k).reshape(n, -1) for k in frame_keys], axis=1).astype(np.float32)
            if frame_keys
            else None
        )
        self.frame_streams = {  # per-frame features read by a declared stream: (N, *shape)
            sp.source: column_array(frames, sp.source).reshape(n, *frame_features(meta.info)[sp.source])
            for sp in self.streams
            if sp.source and sp.source not in meta.streams
        }

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, root: str | Path, *, sensor_keys=None, tolerance_s: float = DEFAULT_TOLERANCE_S, streams=()
    ) -> LeRobotSource:
        """Read meta/ and the frame table and check them (rows, the frame grid, videos); DataError on any
        mismatch, naming the file and the fix. `streams`: the declared sensor streams (`--data.streams`)."""
        meta = load_meta(root, sensor_keys=sensor_keys)
        streams = meta.resolve_streams(streams)
        cams = [c for c in meta.cameras.values() if c.storage != "npy"]
        wanted = ["episode_index", "index", "timestamp", "frame_index", "task_index", ACTION_KEY]
        if STATE_KEY in meta.info["features"]:
            wanted.append(STATE_KEY)
        wanted += [k for k in meta.sensor_keys if k not in meta.streams]
        wanted += [c.key for c in cams if c.storage == "image"]
        wanted += sorted({sp.source for sp in streams if sp.source and sp.source not in meta.streams} - set(wanted))
        frames = read_frames(root, columns=wanted)
        frames = frames.sort_by("index") if not _is_sorted(frames) else frames
        rows = _episode_rows(meta, frames)
        src = cls(meta, frames, rows, tolerance_s, streams)
        src._check_rows()
        if any(c.storage == "video" for c in cams):
            src._check_videos([c for c in cams if c.storage == "video"])
        return src

    def _check_rows(self) -> None:
        meta = self.meta
        feats_fix = "clean the recording and re-create the dataset"
        for e, r in enumerate(self.rows):
            name = meta.episodes[e]["name"]
            check_finite(self.actions[r.start : r.stop], episode=name, stream="action", path="data/", fix=feats_fix)
            check_finite(self.state[r.start : r.stop], episode=name, stream=STATE_KEY, path="data/", fix=feats_fix)
            if self.frame_sensor is not None:
                check_finite(
                    self.frame_sensor[r.start : r.stop],
                    episode=name,
                    stream="+".join(k for k in meta.sensor_keys),
                    path="data/",
                    fix=feats_fix,
                )

    def _check_videos(self, cams) -> None:
        from sensorvla.data.video import probe

        meta, fps, tol = self.meta, float(self.meta.info["fps"]), self.tolerance_s
        fidx = np.asarray(self.frames.column("frame_index").to_numpy(), np.int64)
        for e, r in enumerate(self.rows):
            ts, fi = self.row_time[r.start : r.stop], fidx[r.start : r.stop]
            if not np.array_equal(fi, np.arange(len(fi))):
                raise DataError(
                    "frame_index is not 0..N-1 in order",
                    episode=meta.episodes[e]["name"],
                    path="data/",
                    fix="re-create the dataset (LeRobot numbers the frames of each episode from 0)",
                )
            off = np.abs(ts - fi / fps)
            if off.size and off.max() > tol:
                k = int(np.argmax(off))
                raise DataError(
                    f"row {k} has timestamp {ts[k]:.6f} s but frame {fi[k]} of a {fps:g} fps video is at "
                    f"{fi[k] / fps:.6f} s ({off[k]:.2e} s off the frame grid; tolerance {tol:g} s)",
                    episode=meta.episodes[e]["name"],
                    path=str(meta.root / "data"),
                    fix="write timestamps as frame_index / fps (LeRobot's convention), or raise "
                    "--data.timestamp-tolerance-s if the video itself is off by that much",
                )
        probed: dict[Path, Any] = {}
        for cam in cams:
            for e, ep in enumerate(meta.episodes):
                path = self.video_path(cam.key, e)
                if path not in probed:
                    info = probe(path)
                    if abs(info.fps - fps) > 1e-3 or (info.height, info.width) != cam.shape[:2]:
                        raise DataError(
                            f"video is {info.width}x{info.height} at {info.fps:g} fps; info.json declares "
                            f"{cam.shape[1]}x{cam.shape[0]} at {fps:g} fps for {cam.key!r}",
                            path=str(path),
                            fix="re-encode the video at the dataset's fps and size, or fix meta/info.json",
                        )
                    probed[path] = info
                start = float(ep.get(f"videos/{cam.key}/from_timestamp", 0.0))
                need = start + int(ep["length"]) / fps
                if probed[path].duration_s + tol < need - 0.5 / fps:
                    raise DataError(
                        f"video {cam.key!r} lasts {probed[path].duration_s:.3f} s, the episode needs "
                        f"{start:.3f}..{need:.3f} s ({ep['length']} frames): the video is shorter than its episode",
                        episode=ep["name"],
                        path=str(path),
                        fix="re-encode the episode's video from its frames, or re-create the dataset",
                    )

    def check_all(self, progress: bool | str = False) -> None:
        """Check every episode, not only one split's: each sidecar stream's timestamps (finite, increasing, at the
        declared rate) and values (finite, within MAX_ABS), and every video decoded completely (damaged bytes
        inside an mp4 pass the header probe). `compute_stats` (`sensorvla stats`, the first `train`) runs it."""
        from sensorvla.data.video import decode_all
        from sensorvla.progress import progress as track

        meta, fps = self.meta, float(self.meta.info["fps"])
        for e in track(range(len(self)), desc="check episodes", unit="episodes", mode=progress):
            name = self.name(e)
            for key, s in meta.streams.items():
                if not s.has(e):
                    continue
                s.timestamps(e, name)
                if s.kind == "values":
                    v = s.values(e, name)
                    for lo in range(0, len(v), 65536):
                        block = np.asarray(v[lo : lo + 65536])
                        check_finite(block.reshape(len(block), -1), episode=name, stream=key, start=lo)
        need: dict[Path, int] = {}
        for cam in (c for c in meta.cameras.values() if c.storage == "video"):
            for e, ep in enumerate(meta.episodes):
                path = self.video_path(cam.key, e)
                start = float(ep.get(f"videos/{cam.key}/from_timestamp", 0.0))
                need[path] = max(need.get(path, 0), int(round(start * fps)) + int(ep["length"]))
        for path, frames in track(sorted(need.items()), desc="decode videos", unit="files", mode=progress):
            n = decode_all(path)
            if n < frames:
                raise DataError(
                    f"the video decodes to {n} frames, its episodes need {frames}",
                    path=str(path),
                    fix="re-create the dataset (its video is damaged), or restore the file from the original dataset",
                )

    # --- the episode interface ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> str:
        """The dataset's name of episode `i`."""
        return self.meta.episodes[i]["name"]

    def video_path(self, key: str, e: int) -> Path:
        """The mp4 holding video feature `key` of episode `e`."""
        ep = self.meta.episodes[e]
        template = (
            self.meta.info.get("video_path") or "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        )
        rel = template.format(
            video_key=key,
            chunk_index=int(ep.get(f"videos/{key}/chunk_index", 0)),
            file_index=int(ep.get(f"videos/{key}/file_index", 0)),
        )
        return inside_dataset(self.meta.root, rel, f"video of {key!r}")

    def row_times(self, e: int) -> tuple[np.ndarray, float]:
        """(own-clock action-row times (N,), clock offset): the sidecar's true times, else the parquet's."""
        s = self.meta.streams.get("action")
        if s is not None and s.has(e):
            return np.asarray(s.timestamps(e, self.name(e)), np.float64), s.offset(e)
        r = self.rows[e]
        return self.row_time[r.start : r.stop], 0.0

    def frame_tasks(self, e: int) -> list[str]:
        """The task string of each frame of episode `e`."""
        r = self.rows[e]
        return [self.meta.tasks[int(k)] for k in self.task_index[r.start : r.stop]]

    def load(self, i: int) -> EpisodeData:
        """Load episode `i`: actions, state, camera frames and sensor streams on the common clock."""
        meta, e = self.meta, int(i)
        r, name = self.rows[e], self.name(e)
        a_ts, a_off = self.row_times(e)
        streams = {"action": Stream(a_ts, self.actions[r.start : r.stop], a_off)}
        st = meta.streams.get(STATE_KEY)
        has_state = st is not None and st.has(e)
        streams["state"] = st.stream(e, name) if has_state else Stream(a_ts, self.state[r.start : r.stop], a_off)
        for view, cam in meta.cameras.items():
            timing = meta.streams.get(cam.key)
            if cam.storage == "npy":
                streams[f"image.{view}"] = timing.stream(e, name)
            elif timing is not None and timing.has(e):
                streams[f"image.{view}"] = Stream(timing.timestamps(e, name), self._frames(cam, e), timing.offset(e))
            else:
                streams[f"image.{view}"] = Stream(a_ts, self._frames(cam, e), a_off)
        keys = meta.sensor_keys
        if len(keys) == 1 and keys[0] in meta.streams:
            if meta.streams[keys[0]].has(e):
                streams["sensor"] = meta.streams[keys[0]].stream(e, name)
        elif self.frame_sensor is not None:
            streams["sensor"] = Stream(a_ts, self.frame_sensor[r.start : r.stop], a_off)
        tasks = self.frame_tasks(e)
        extra: dict[str, Any] = {"frame_tasks": tasks} if len(set(tasks)) > 1 else {}
        return EpisodeData.from_streams(name, tasks[0] if tasks else meta.episodes[i]["instruction"], streams, extra)

    def sensor_stream(self, e: int, source: str) -> Stream | None:
        """A declared stream's source in episode `e`: a sidecar values stream (None where the episode has none) or a
        per-frame feature on the row clock; values (N, *shape)."""
        s = self.meta.streams.get(source)
        if s is not None:
            return s.stream(e, self.name(e)) if s.has(e) else None
        ts, off = self.row_times(e)
        r = self.rows[e]
        return Stream(ts, self.frame_streams[source][r.start : r.stop], off)

    def _frames(self, cam, e: int):
        """The frames of camera `cam` in episode `e`, one per action row: from its video or the frame table."""
        meta, r = self.meta, self.rows[e]
        if cam.storage == "video":
            from sensorvla.data.video import VideoFrames

            return VideoFrames(
                self.video_path(cam.key, e),
                float(meta.episodes[e].get(f"videos/{cam.key}/from_timestamp", 0.0)),
                float(meta.info["fps"]),
                r.stop - r.start,
                cam.shape,
                self.tolerance_s,
            )
        cells = self.frames.column(cam.key).slice(r.start, r.stop - r.start).to_pylist()
        return ParquetImages(cells, cam.shape, meta.root, f"{cam.key} of episode {e}")

    def global_index(self, e: int) -> np.ndarray:
        """The global frame indices of episode `e`'s rows."""
        r = self.rows[e]
        return self.index[r.start : r.stop]


def _is_sorted(frames) -> bool:
    idx = np.asarray(frames.column("index").to_numpy())
    return bool(np.all(np.diff(idx) > 0))


def _episode_rows(meta: DatasetMeta, frames) -> list[_Rows]:
    """Row ranges of each episode in the (index-sorted) frame table; checks them against meta/episodes."""
    ep_col = np.asarray(frames.column("episode_index").to_numpy(), np.int64)
    out = []
    starts = np.searchsorted(ep_col, np.arange(len(meta.episodes)), side="left")
    stops = np.searchsorted(ep_col, np.arange(len(meta.episodes)), side="right")
    if np.any(np.diff(ep_col) < 0):
        raise DataError(
            "frame rows are not grouped by episode in index order",
            path=str(meta.root / "data"),
            fix="re-create the dataset (rows of an episode must be contiguous)",
        )
    for e, ep in enumerate(meta.episodes):
        n = int(stops[e] - starts[e])
        if n != int(ep["length"]):
            raise DataError(
                f"episode has {n} frame rows, meta/episodes says {ep['length']}",
                episode=ep.get("name", f"episode_{e:06d}"),
                path=str(meta.root / "data"),
                fix="re-create the dataset; a data file is missing or truncated",
            )
        out.append(_Rows(int(starts[e]), int(stops[e])))
    return out


def open_source(
    root: str | Path, *, sensor_keys=None, tolerance_s: float = DEFAULT_TOLERANCE_S, streams=()
) -> LeRobotSource:
    """The source of a dataset folder (every sensorvla dataset is a LeRobot v3 folder)."""
    return LeRobotSource.open(root, sensor_keys=sensor_keys, tolerance_s=tolerance_s, streams=streams)


__all__ = ["EpisodeSource", "LeRobotSource", "open_source", "CAMERA_PREFIX"]
