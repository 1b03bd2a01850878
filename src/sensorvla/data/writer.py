"""Write episodes as a LeRobot v3 dataset that LeRobot opens fully, plus the own-rate sidecar streams.

LeRobot sees one row per action frame at `timestamp = frame_index / fps`: the action, the newest robot
state at or before the row's time, and each camera as a video whose frame k is the newest camera image at
or before row k (so a 5 Hz camera is held for two 10 Hz rows). The sidecar keeps what LeRobot's single
clock cannot: the true action times, the full-rate state, each video frame's capture time and the
high-rate sensor, each on its own clock with its offset. Everything is built in a temp folder and
renamed, so a failure leaves no output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.layout import (
    ACTION_KEY,
    ACTION_NAMES_7,
    CAMERA_PREFIX,
    CODEBASE_VERSION,
    DATA_PATH,
    EPISODES_FILE,
    INFO_FILE,
    STATE_KEY,
    TASKS_FILE,
    VIDEO_PATH,
)
from sensorvla.data.sidecar import StreamWriter
from sensorvla.data.types import DataError, EpisodeData, check_increasing, median_rate
from sensorvla.io import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("video", "npy")
DATA_FILE_MB = 100  # LeRobot's defaults for when a data / video file is rotated
VIDEO_FILE_MB = 200
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
SIDECAR_FORMAT = "sensorvla-sidecar/1"
MAX_ABS = 1e9  # a sensor, state or action value beyond this is refused as corrupt (it would dominate the stats)


# --- validation -----------------------------------------------------------------------------------------
def _check_stream(ep: EpisodeData, name: str, ts: np.ndarray, data, fix: str) -> None:
    ts = np.asarray(ts)
    if ts.ndim != 1:
        raise DataError(f"{name} timestamps must be 1-D, got shape {ts.shape}", episode=ep.name, path=name, fix=fix)
    if data is not None and len(data) != len(ts):
        raise DataError(
            f"{name} has {len(ts)} timestamps but {len(data)} rows (truncated array?)",
            episode=ep.name,
            path=name,
            fix=fix,
        )
    check_increasing(ts, what=name, episode=ep.name, path=name, fix=fix)


def check_finite(
    arr,
    *,
    episode: str,
    stream: str,
    path: str | None = None,
    fix: str = "",
    start: int = 0,
    max_abs: float | None = MAX_ABS,
) -> None:
    """DataError naming the episode, stream, column and sample index of the first NaN/inf in `arr` (N, C), or of
    the first value beyond `max_abs` (MAX_ABS: a corrupt sample such as 3e38 would dominate the statistics)."""
    a = np.asarray(arr)
    bad = ~np.isfinite(a)
    what = "NaN/inf"
    if not bad.any() and max_abs is not None and a.dtype.kind == "f":
        bad = np.abs(a) > max_abs
        what = f"values beyond +-{max_abs:g} (absurd for a measurement: corrupt samples)"
    if bad.any():
        where = np.argwhere(bad)[0]
        row, col = int(where[0]) + start, int(where[1]) if a.ndim > 1 else 0
        default_fix = "drop or interpolate the corrupt samples and re-create the dataset"
        if what != "NaN/inf":
            default_fix += " (if the unit really reaches that, store it in a larger unit, e.g. kN instead of N)"
        raise DataError(
            f"{stream} contains {what} ({int(bad.sum())} values; first at sample {row}, column {col}"
            f"{'' if what == 'NaN/inf' else f': {float(a[tuple(where)]):g}'})",
            episode=episode,
            path=path or getattr(arr, "filename", None) or stream,  # a memory map knows its file
            fix=fix or default_fix,
        )


def validate_episode(ep: EpisodeData, *, views: Sequence[str] | None = None, min_actions: int = 1) -> None:
    """Raise DataError (naming the episode, the stream and the fix) for any inconsistency."""
    fix = "re-export the episode; the recording is incomplete or corrupt"
    _check_stream(ep, "action", ep.action_timestamps, ep.actions, fix)
    _check_stream(ep, "state", ep.state_timestamps, ep.state, fix)
    if len(ep.actions) < min_actions:
        raise DataError(
            f"episode has {len(ep.actions)} action frames, fewer than the horizon ({min_actions})",
            episode=ep.name,
            path="action",
            fix="drop the episode or lower the horizon (--min-actions)",
        )
    for name, arr in (("action", ep.actions), ("state", ep.state)):
        if np.asarray(arr).ndim != 2:
            raise DataError(f"{name} must be 2-D (N, D)", episode=ep.name, path=name, fix=fix)
        check_finite(arr, episode=ep.name, stream=name, fix="clean the recording")
    if (ep.sensor is None) != (ep.sensor_timestamps is None):
        raise DataError(
            "sensor data and sensor timestamps must both be present or both absent",
            episode=ep.name,
            path="sensor",
            fix=fix,
        )
    if ep.sensor is not None:
        _check_stream(ep, "sensor", ep.sensor_timestamps, ep.sensor, fix)
        if np.asarray(ep.sensor).ndim != 2:
            raise DataError("sensor must be 2-D (N, C_s)", episode=ep.name, path="sensor", fix=fix)
        check_finite(
            ep.sensor,
            episode=ep.name,
            stream="sensor",
            fix="drop or interpolate the corrupt samples, or import the episode without sensor",
        )
    if views is not None:
        missing = sorted(set(views) - set(ep.images))
        if missing:
            raise DataError(
                f"view(s) {missing} missing (the dataset's views are {sorted(views)})",
                episode=ep.name,
                path="images",
                fix="drop the episode or record every view",
            )
    for view, stream in ep.images.items():
        _check_stream(ep, f"image.{view}", stream.timestamps, stream.frames, fix)
        frames = stream.frames
        shape, dtype = tuple(getattr(frames, "shape", np.shape(frames))), getattr(frames, "dtype", None)
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise DataError(
                f"view {view} frames must be uint8 (N, h, w, 3), got {dtype} {shape}",
                episode=ep.name,
                path=f"image.{view}",
                fix=fix,
            )


# --- statistics in LeRobot's layout ---------------------------------------------------------------------
def lerobot_stats(x: np.ndarray, axis=0, keepdims: bool = False) -> dict[str, Any]:
    """min/max/mean/std/count/q01..q99 of `x` along `axis`, as LeRobot's meta/stats.json stores them."""
    x = np.asarray(x, np.float64)
    out = {
        "min": x.min(axis=axis, keepdims=keepdims),
        "max": x.max(axis=axis, keepdims=keepdims),
        "mean": x.mean(axis=axis, keepdims=keepdims),
        "std": x.std(axis=axis, keepdims=keepdims),
    }
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = np.quantile(x, q, axis=axis, keepdims=keepdims)
    res = {k: np.asarray(v).tolist() for k, v in out.items()}
    res["count"] = [int(x.shape[0])]
    return res


def _image_stats(samples: list[np.ndarray]) -> dict[str, Any]:
    """Per-channel stats in [0, 1] with shape (3, 1, 1), from sampled (h, w, 3) uint8 frames."""
    x = np.stack(samples).astype(np.float32) / 255.0  # (n, h, w, 3)
    x = np.transpose(x, (0, 3, 1, 2))  # (n, 3, h, w) as LeRobot
    st = lerobot_stats(x, axis=(0, 2, 3), keepdims=True)
    st = {k: (np.asarray(v)[0].tolist() if k != "count" else v) for k, v in st.items()}
    st["count"] = [len(samples)]
    return st


# --- the writer ------------------------------------------------------------------------------------------
def _tasks_table(tasks: dict[str, int]):
    """meta/tasks.parquet as LeRobot writes it: task_index, indexed (pandas index) by the task string."""
    import pyarrow as pa

    ordered = sorted(tasks.items(), key=lambda kv: kv[1])
    table = pa.table(
        {
            "task_index": pa.array([i for _, i in ordered], pa.int64()),
            "__index_level_0__": pa.array([t for t, _ in ordered], pa.large_string()),
        }
    )
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "str", "metadata": None}
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _frames_table(cols: dict[str, np.ndarray], features: dict[str, Any]):
    import pyarrow as pa

    arrays, fields, hf = [], [], {}
    for key, values in cols.items():
        ft = features[key]
        if key in (ACTION_KEY, STATE_KEY):
            n = int(ft["shape"][0])
            flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
            arr = pa.FixedSizeListArray.from_arrays(flat, n)
            hf[key] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": n, "_type": "List"}
        else:
            arr = pa.array(values, pa.float32() if ft["dtype"] == "float32" else pa.int64())
            hf[key] = {"dtype": ft["dtype"], "_type": "Value"}
        arrays.append(arr)
        fields.append(pa.field(key, arr.type))
    schema = pa.schema(fields, metadata={b"huggingface": json.dumps({"info": {"features": hf}}).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


class _Videos:
    """One encoder per camera; rotates to a new file past VIDEO_FILE_MB between episodes."""

    def __init__(self, root: Path, fps: float, codec: str, crf: int):
        self.root, self.fps, self.codec, self.crf = root, fps, codec, crf
        self.enc: dict[str, Any] = {}
        self.where: dict[str, tuple[int, int]] = {}

    def write(self, key: str, frames: Iterable[np.ndarray], n: int, shape) -> dict[str, Any]:
        from sensorvla.data.video import VideoEncoder

        enc = self.enc.get(key)
        chunk, file = self.where.get(key, (0, 0))
        if enc is not None and enc.nbytes() > VIDEO_FILE_MB * 2**20:
            enc.close()
            chunk, file = (chunk + 1, 0) if file + 1 >= 1000 else (chunk, file + 1)
            enc = None
        if enc is None:
            path = self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            enc = VideoEncoder(path, self.fps, shape[0], shape[1], codec=self.codec, crf=self.crf)
            self.enc[key], self.where[key] = enc, (chunk, file)
        start = enc.frames
        for f in frames:
            enc.add(np.asarray(f, np.uint8))
        return {
            f"videos/{key}/chunk_index": chunk,
            f"videos/{key}/file_index": file,
            f"videos/{key}/from_timestamp": start / self.fps,
            f"videos/{key}/to_timestamp": (start + n) / self.fps,
        }

    def close(self) -> None:
        for enc in self.enc.values():
            enc.close()


def _held_indices(frame_t: np.ndarray, row_t: np.ndarray) -> np.ndarray:
    """For each row time, the newest frame at or before it (-1: none yet)."""
    return np.searchsorted(frame_t, row_t, side="right") - 1


def _sample_rows(n: int) -> np.ndarray:
    """LeRobot-like frame sampling for image stats: about n^0.75 frames, at least 10 (all when fewer)."""
    k = min(n, max(10, int(n**0.75)))
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


class _DatasetWriter:
    """Builds one dataset in `tmp`: `add(e, ep)` per episode (streams, videos, frame rows), then `finish()`."""

    def __init__(self, tmp: Path, *, dataset_id: str, action_fps: float, extra_info: dict[str, Any], **opts):
        self.tmp, self.dataset_id, self.action_fps, self.extra_info = tmp, dataset_id, action_fps, extra_info
        self.image_format, self.codec, self.robot_type = opts["image_format"], opts["video_codec"], opts["robot_type"]
        self.fps = max(1, int(round(action_fps)))  # LeRobot's clock: an integer fps
        self.views: list[str] | None = None
        self.dims: dict[str, Any] = {}
        self.cam_shapes: dict[str, tuple[int, int, int]] = {}
        self.features: dict[str, Any] = {}
        self.tasks: dict[str, int] = {}
        self.ep_rows: list[dict[str, Any]] = []
        self.columns: dict[str, list[np.ndarray]] = {}  # every frame column, for meta/stats.json
        self.img_samples: dict[str, list[np.ndarray]] = {}
        self.streams = {"action": StreamWriter(tmp, "action", "timing", rate_hz=action_fps)}
        self.videos = _Videos(tmp, self.fps, opts["video_codec"], opts["video_crf"])
        self.data_writer, self.data_file, self.rows_in_file, self.index = None, (0, 0), 0, 0

    # --- per episode -----------------------------------------------------------------------------------
    def _first(self, ep: EpisodeData) -> None:
        """The first episode fixes the views, widths, image sizes and the feature table."""
        info = self.extra_info
        self.views = sorted(ep.images)
        self.dims = {"action_dim": ep.actions.shape[1], "state_dim": ep.state.shape[1]}
        self.cam_shapes = {v: tuple(int(x) for x in ep.images[v].frames.shape[1:]) for v in self.views}
        self.features = _features(self.views, self.cam_shapes, self.dims, info, self.image_format, self.codec, self.fps)
        self.streams[STATE_KEY] = StreamWriter(self.tmp, STATE_KEY, "values", rate_hz=info.get("state_rate"))
        kind = "timing" if self.image_format == "video" else "frames"
        for v in self.views:
            key = CAMERA_PREFIX + v
            self.streams[key] = StreamWriter(self.tmp, key, kind, rate_hz=info.get("camera_rate"))

    def _check(self, ep: EpisodeData) -> None:
        """Every episode must match the first one's views, widths, image sizes and sensor channels."""
        extra = sorted(set(ep.images) - set(self.views))
        if extra:
            raise DataError(
                f"view(s) {extra} not in the first episode's views {self.views}",
                episode=ep.name,
                path="images",
                fix="use the same camera set in every episode",
            )
        for key, width in (("action_dim", ep.actions.shape[1]), ("state_dim", ep.state.shape[1])):
            if width != self.dims[key]:
                raise DataError(
                    f"{key} {width} differs from the dataset's {self.dims[key]}",
                    episode=ep.name,
                    fix="convert every episode with the same robot/action definition",
                )
        for v in self.views:
            shape = tuple(int(x) for x in ep.images[v].frames.shape[1:])
            if shape != self.cam_shapes[v]:
                raise DataError(
                    f"view {v} frames are {shape}, earlier episodes {self.cam_shapes[v]}",
                    episode=ep.name,
                    path=f"image.{v}",
                    fix="use one image size per camera (--image-size)",
                )
        if ep.sensor is not None:
            c = ep.sensor.shape[1]
            if self.dims.setdefault("sensor_channels", c) != c:
                raise DataError(
                    f"sensor has {c} channels, the dataset {self.dims['sensor_channels']}",
                    episode=ep.name,
                    path="sensor",
                    fix="use one sensor configuration per dataset",
                )

    def add(self, e: int, ep: EpisodeData) -> None:
        """Write episode e: its sidecar streams, its camera frames and its frame rows."""
        if self.views is None:
            self._first(ep)
        self._check(ep)
        off = {k: float(v) for k, v in ep.clock_offsets.items()}
        n = len(ep.actions)
        a_own = np.asarray(ep.action_timestamps, np.float64)
        a_t = a_own + off.get("action", 0.0)
        s_own = np.asarray(ep.state_timestamps, np.float64)
        state = np.asarray(ep.state, np.float32)
        self.streams["action"].add(e, a_own, None, off.get("action", 0.0))
        self.streams[STATE_KEY].add(e, s_own, state, off.get("state", 0.0))
        if ep.sensor is not None:
            if "sensor" not in self.streams:
                self.streams["sensor"] = StreamWriter(
                    self.tmp,
                    "sensor",
                    "values",
                    rate_hz=self.extra_info.get("sensor_rate") or median_rate(ep.sensor_timestamps),
                    force_channels=int(self.extra_info.get("force_channels", 1)),
                )
            self.streams["sensor"].add(
                e, ep.sensor_timestamps, np.asarray(ep.sensor, np.float32), off.get("sensor", 0.0)
            )
        for key, st in ep.sensor_streams.items():  # declared with their encoder (`extra_info["encoders"]`)
            values = np.asarray(st.values, np.float32)
            check_finite(values.reshape(len(values), -1), episode=ep.name, stream=key, fix="drop the corrupt samples")
            if key not in self.streams:
                encoder = self.extra_info.get("encoders", {}).get(key)
                extra = {"encoder": encoder} if encoder else {}
                self.streams[key] = StreamWriter(self.tmp, key, "values", rate_hz=median_rate(st.timestamps), **extra)
            self.streams[key].add(e, st.timestamps, values, st.offset)
        row: dict[str, Any] = {
            "episode_index": e,
            "tasks": [ep.instruction],
            "length": n,
            "dataset_from_index": self.index,
            "dataset_to_index": self.index + n,
        }
        for v in self.views:
            row.update(self._camera(e, v, ep.images[v], off.get(f"image.{v}", 0.0), a_t))
        row.update(self._rows(e, ep, state[np.maximum(_held_indices(s_own + off.get("state", 0.0), a_t), 0)]))
        row.update(
            {
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
                "name": ep.name,
                "extra": json.dumps(ep.extra, default=str),
            }
        )
        self.ep_rows.append(row)

    def _camera(self, e: int, view: str, stream, c_off: float, a_t: np.ndarray) -> dict[str, Any]:
        """Video: the newest capture at or before each action row, capture times in the sidecar.
        npy: the frames at the camera's own rate and clock, in the sidecar."""
        key, shape = CAMERA_PREFIX + view, self.cam_shapes[view]
        c_own = np.asarray(stream.timestamps, np.float64)
        cols: dict[str, Any] = {}
        if self.image_format == "npy":
            self.streams[key].add(e, c_own, np.asarray(stream.frames, np.uint8), c_off)
            picks = _sample_rows(len(c_own))
        else:
            held = np.maximum(_held_indices(c_own + c_off, a_t), 0)
            self.streams[key].add(e, c_own[held], None, c_off)
            cols = self.videos.write(key, (stream.frames[k] for k in held), len(a_t), shape)
            picks = held[_sample_rows(len(a_t))]
        stride = (max(1, shape[0] // 32), max(1, shape[1] // 32))  # per-channel stats only need a few pixels
        self.img_samples.setdefault(key, []).extend(
            np.asarray(stream.frames[int(k)])[:: stride[0], :: stride[1]] for k in picks[:: max(1, len(picks) // 8)]
        )
        return cols

    def _rows(self, e: int, ep: EpisodeData, baked_state: np.ndarray) -> dict[str, Any]:
        """Append the episode's frame rows to the data parquet (rotated past DATA_FILE_MB)."""
        import pyarrow.parquet as pq

        n = len(ep.actions)
        task = self.tasks.setdefault(ep.instruction, len(self.tasks))
        cols = {
            ACTION_KEY: np.asarray(ep.actions, np.float32),
            STATE_KEY: baked_state,
            "timestamp": (np.arange(n) / self.fps).astype(np.float32),  # LeRobot: frame_index / fps
            "frame_index": np.arange(n),
            "episode_index": np.full(n, e),
            "index": np.arange(self.index, self.index + n),
            "task_index": np.full(n, task),
        }
        table = _frames_table(cols, self.features)
        row_bytes = 4 * (self.dims["action_dim"] + self.dims["state_dim"]) + 40
        if self.data_writer is not None and (self.rows_in_file + n) * row_bytes > DATA_FILE_MB * 2**20:
            self.data_writer.close()
            self.data_writer, self.rows_in_file = None, 0
            self.data_file = (self.data_file[0], self.data_file[1] + 1)
        if self.data_writer is None:
            path = self.tmp / DATA_PATH.format(chunk_index=self.data_file[0], file_index=self.data_file[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            self.data_writer = pq.ParquetWriter(path, table.schema)
        self.data_writer.write_table(table)
        self.rows_in_file += n
        self.index += n
        for k, v in cols.items():
            self.columns.setdefault(k, []).append(v)
        return {"data/chunk_index": self.data_file[0], "data/file_index": self.data_file[1]}

    # --- the end -----------------------------------------------------------------------------------------
    def close(self) -> None:
        self.videos.close()
        if self.data_writer is not None:
            self.data_writer.close()

    def finish(self) -> None:
        """Episodes, tasks, sidecar indexes, LeRobot stats and info.json."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.views is None:
            raise DataError("no episodes to write", fix="check the source folder")
        (self.tmp / EPISODES_FILE).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.ep_rows), self.tmp / EPISODES_FILE)
        pq.write_table(_tasks_table(self.tasks), self.tmp / TASKS_FILE)
        lengths = {int(r["episode_index"]): int(r["length"]) for r in self.ep_rows}
        streams = {k: spec for k, w in self.streams.items() if (spec := w.finish(lengths)) is not None}
        stats = {}
        for k, parts in self.columns.items():
            x = np.concatenate(parts)
            stats[k] = lerobot_stats(x if x.ndim == 2 else x[:, None])
        if self.image_format == "video":
            stats.update({k: _image_stats(v) for k, v in self.img_samples.items()})
        atomic_write_json(self.tmp / "meta" / "stats.json", stats)
        views = self.views
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type or self.extra_info.get("source"),
            "total_episodes": len(self.ep_rows),
            "total_frames": self.index,
            "total_tasks": len(self.tasks),
            "chunks_size": 1000,
            "data_files_size_in_mb": DATA_FILE_MB,
            "video_files_size_in_mb": VIDEO_FILE_MB,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.ep_rows)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.image_format == "video" and views else None,
            "features": self.features,
            "sensorvla": {
                "format": SIDECAR_FORMAT,
                "dataset_id": self.dataset_id,
                "action_fps": float(self.action_fps),
                "views": views,
                "image_storage": self.image_format,
                "image_shape": list(self.cam_shapes[views[0]]) if views else [],
                "sensor_channels": self.dims.get("sensor_channels", 0),
                **self.extra_info,
                "streams": streams,
            },
        }
        atomic_write_json(self.tmp / INFO_FILE, info)


def write_dataset(
    episodes: Iterable[EpisodeData],
    out_dir: str | Path,
    *,
    dataset_id: str,
    action_fps: float,
    min_actions: int = 1,
    overwrite: bool = False,
    progress: bool | str = True,
    extra_info: dict[str, Any] | None = None,
    image_format: str = "video",
    video_codec: str = "h264",
    video_crf: int = 20,
    robot_type: str | None = None,
) -> Path:
    """Validate and write episodes as a LeRobot v3 dataset + sidecar (see the module docstring).

    Args:
        episodes: EpisodeData, consumed one at a time (a generator keeps memory flat).
        out_dir: the dataset folder to create; on any error nothing is left there.
        dataset_id: recorded in info.json and in the norm-stats fingerprint.
        action_fps: the action rate (LeRobot's fps; info.json stores it rounded, the sidecar exactly).
        min_actions: episodes with fewer action frames are an error.
        image_format: "video" (mp4, LeRobot video features) or "npy" (raw frames at the camera's own rate
            and clock in the sidecar: lossless and memory-mapped, but not visible to LeRobot).
        video_codec: "h264" (fast to decode; default) or "av1" (LeRobot's default, smaller).
        video_crf: encoder quality (lower is better and larger).
    """
    from sensorvla.progress import progress as track

    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r}: choose one of {IMAGE_FORMATS}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) or choose another --out")
    if abs(round(action_fps) - action_fps) > 1e-6:
        logger.warning(
            "action rate %.6g Hz is not an integer: LeRobot needs an integer fps, info.json records %d and "
            "sensorvla keeps the exact rate (sensorvla.action_fps)",
            action_fps,
            max(1, round(action_fps)),
        )
    with atomic_dir(out_dir) as tmp:
        w = _DatasetWriter(
            tmp,
            dataset_id=dataset_id,
            action_fps=action_fps,
            extra_info=dict(extra_info or {}),
            image_format=image_format,
            video_codec=video_codec,
            video_crf=video_crf,
            robot_type=robot_type,
        )
        views = None
        try:
            for e, ep in enumerate(track(episodes, desc="writing episodes", unit="episodes", mode=progress)):
                validate_episode(ep, views=views, min_actions=min_actions)
                w.add(e, ep)
                views = w.views
        finally:
            w.close()
        w.finish()
    return out_dir


def _features(views, cam_shapes, dims, extra_info, image_format, codec, fps_int) -> dict[str, Any]:
    feats: dict[str, Any] = {
        ACTION_KEY: {
            "dtype": "float32",
            "shape": [dims["action_dim"]],
            "names": ACTION_NAMES_7 if dims["action_dim"] == 7 else None,
        },
        STATE_KEY: {"dtype": "float32", "shape": [dims["state_dim"]], "names": extra_info.get("state_names")},
    }
    if image_format == "video":
        for v in views:
            h, w, c = cam_shapes[v]
            feats[CAMERA_PREFIX + v] = {
                "dtype": "video",
                "shape": [h, w, c],
                "names": ["height", "width", "channels"],
                "info": {
                    "video.height": h,
                    "video.width": w,
                    "video.codec": codec,
                    "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False,
                    "video.fps": fps_int,
                    "video.channels": c,
                    "has_audio": False,
                },
            }
    feats.update(
        {
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        }
    )
    return feats
