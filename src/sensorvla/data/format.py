"""The native episode format: the LeRobot v3 layout plus per-episode multi-rate sidecars.

    meta/info.json                       codebase_version v3.0, fps (= action rate), features, totals, and a
                                         "sensorvla" block (views, rates, sensor channels, action semantics)
    meta/tasks.parquet                   task_index, task
    meta/episodes/chunk-000/file-000.parquet   one row per episode (length, task, has_sensor, clock offsets)
    data/chunk-000/file-000.parquet      one row per action frame: timestamp, frame_index, episode_index,
                                         index, task_index, action, observation.state (newest state <= t)
    streams/episode_XXXXXX/              own-rate streams as plain .npy (memory-mappable, never pickled):
        state_timestamps.npy, state.npy          (N_st,), (N_st, D_st)
        sensor_timestamps.npy, sensor.npy        (N_s,), (N_s, C_s)   (absent for sensor-less episodes)
        image_<view>_timestamps.npy, image_<view>.npy   (N_v,), (N_v, h, w, 3) uint8
Timestamps are stored on each stream's own clock; the per-stream offsets in the episode row are added
when reading. See docs/data-format.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.types import DataError, EpisodeData
from sensorvla.io import atomic_dir

logger = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
DATA_FILE = "data/chunk-000/file-000.parquet"
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"
TASKS_FILE = "meta/tasks.parquet"
ACTION_NAMES_7 = ["dx_mm", "dy_mm", "dz_mm", "droll_deg", "dpitch_deg", "dyaw_deg", "tool"]


def _check_stream(ep: EpisodeData, name: str, ts: np.ndarray, data: np.ndarray | None, fix: str) -> None:
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
    if not np.all(np.isfinite(ts)):
        raise DataError(f"{name} timestamps contain NaN/inf", episode=ep.name, path=name, fix=fix)
    if len(ts) > 1 and np.any(np.diff(ts) <= 0):
        i = int(np.argmax(np.diff(ts) <= 0))
        raise DataError(
            f"{name} timestamps are not strictly increasing (at index {i + 1}: {ts[i]:.6f} -> {ts[i + 1]:.6f})",
            episode=ep.name,
            path=name,
            fix="sort the samples by time and drop duplicates, or fix the recorder clock",
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
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{name} contains NaN/inf", episode=ep.name, path=name, fix="clean the recording")
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
        bad = ~np.isfinite(np.asarray(ep.sensor))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DataError(
                f"sensor contains NaN/inf ({int(bad.sum())} values, first at sample {row})",
                episode=ep.name,
                path="sensor",
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
        frames = np.asarray(stream.frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise DataError(
                f"view {view} frames must be uint8 (N, h, w, 3), got {frames.dtype} {frames.shape}",
                episode=ep.name,
                path=f"image.{view}",
                fix=fix,
            )


def _save_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)


def write_dataset(
    episodes: Iterable[EpisodeData],
    out_dir: str | Path,
    *,
    dataset_id: str,
    action_fps: float,
    min_actions: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    extra_info: dict[str, Any] | None = None,
) -> Path:
    """Validate and write episodes; built in a temp folder and renamed, so a failure leaves no output."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) or choose another --out")
    with atomic_dir(out_dir) as tmp:
        frames, ep_rows, tasks = [], [], {}
        views: list[str] | None = None
        dims: dict[str, Any] = {}
        index = 0
        for e, ep in enumerate(tqdm(episodes, desc="writing episodes", disable=not progress)):
            validate_episode(ep, views=views, min_actions=min_actions)
            if views is None:
                views = sorted(ep.images)
                dims = {
                    "action_dim": ep.actions.shape[1],
                    "state_dim": ep.state.shape[1],
                    "image_shape": list(np.asarray(next(iter(ep.images.values())).frames).shape[1:]),
                }
            extra = sorted(set(ep.images) - set(views))
            if extra:
                raise DataError(
                    f"view(s) {extra} not in the first episode's views {views}",
                    episode=ep.name,
                    path="images",
                    fix="use the same camera set in every episode",
                )
            for key, width in (("action_dim", ep.actions.shape[1]), ("state_dim", ep.state.shape[1])):
                if width != dims[key]:
                    raise DataError(
                        f"{key} {width} differs from the dataset's {dims[key]}",
                        episode=ep.name,
                        fix="convert every episode with the same robot/action definition",
                    )
            if ep.sensor is not None:
                c = ep.sensor.shape[1]
                if dims.setdefault("sensor_channels", c) != c:
                    raise DataError(
                        f"sensor has {c} channels, the dataset {dims['sensor_channels']}",
                        episode=ep.name,
                        path="sensor",
                        fix="use one sensor configuration per dataset",
                    )
            task = tasks.setdefault(ep.instruction, len(tasks))
            sdir = tmp / "streams" / f"episode_{e:06d}"
            sdir.mkdir(parents=True)
            _save_npy(sdir / "state_timestamps.npy", np.asarray(ep.state_timestamps, np.float64))
            _save_npy(sdir / "state.npy", np.asarray(ep.state, np.float32))
            if ep.sensor is not None:
                _save_npy(sdir / "sensor_timestamps.npy", np.asarray(ep.sensor_timestamps, np.float64))
                _save_npy(sdir / "sensor.npy", np.asarray(ep.sensor, np.float32))
            for view, stream in ep.images.items():
                _save_npy(sdir / f"image_{view}_timestamps.npy", np.asarray(stream.timestamps, np.float64))
                _save_npy(sdir / f"image_{view}.npy", np.asarray(stream.frames, np.uint8))
            off = {k: float(v) for k, v in ep.clock_offsets.items()}
            a_ts = np.asarray(ep.action_timestamps, np.float64) + off.get("action", 0.0)
            s_ts = np.asarray(ep.state_timestamps, np.float64) + off.get("state", 0.0)
            for i, t in enumerate(a_ts):
                j = int(np.searchsorted(s_ts, t, side="right")) - 1
                frames.append(
                    {
                        "timestamp": float(t),
                        "frame_index": i,
                        "episode_index": e,
                        "index": index,
                        "task_index": task,
                        "action": np.asarray(ep.actions[i], np.float32).tolist(),
                        "observation.state": np.asarray(ep.state[max(j, 0)], np.float32).tolist(),
                    }
                )
                index += 1
            ep_rows.append(
                {
                    "episode_index": e,
                    "name": ep.name,
                    "length": len(ep.actions),
                    "task_index": task,
                    "tasks": [ep.instruction],
                    "has_sensor": ep.sensor is not None,
                    "clock_offsets": json.dumps(off),
                    "extra": json.dumps(ep.extra, default=str),
                }
            )
        if views is None:
            raise DataError("no episodes to write", fix="check the source folder")
        for rel in (DATA_FILE, EPISODES_FILE):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(frames), tmp / DATA_FILE)
        pq.write_table(pa.Table.from_pylist(ep_rows), tmp / EPISODES_FILE)
        pq.write_table(pa.Table.from_pylist([{"task_index": i, "task": t} for t, i in tasks.items()]), tmp / TASKS_FILE)
        info = {
            "codebase_version": CODEBASE_VERSION,
            "fps": action_fps,
            "total_episodes": len(ep_rows),
            "total_frames": index,
            "total_tasks": len(tasks),
            "chunks_size": 1000,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "features": {
                "action": {
                    "dtype": "float32",
                    "shape": [dims["action_dim"]],
                    "names": ACTION_NAMES_7 if dims["action_dim"] == 7 else None,
                },
                "observation.state": {"dtype": "float32", "shape": [dims["state_dim"]]},
                "timestamp": {"dtype": "float64", "shape": [1]},
                "frame_index": {"dtype": "int64", "shape": [1]},
                "episode_index": {"dtype": "int64", "shape": [1]},
                "index": {"dtype": "int64", "shape": [1]},
                "task_index": {"dtype": "int64", "shape": [1]},
            },
            "sensorvla": {
                "dataset_id": dataset_id,
                "views": views,
                "image_shape": dims["image_shape"],
                "sensor_channels": dims.get("sensor_channels", 0),
                **(extra_info or {}),
            },
        }
        (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return out_dir


@dataclass
class DatasetMeta:
    """What a dataset declares in meta/ (read once; cheap)."""

    root: Path
    dataset_id: str
    action_fps: float
    views: list[str]
    action_dim: int
    state_dim: int
    sensor_channels: int
    force_channels: int
    sensor_rate: float
    image_shape: list[int]
    episodes: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def stream_dir(self, episode_index: int) -> Path:
        return self.root / "streams" / f"episode_{episode_index:06d}"


def load_meta(root: str | Path) -> DatasetMeta:
    """Read meta/ of a sensorvla dataset; DataError with the fix when the folder is not one."""
    import pyarrow.parquet as pq

    root = Path(root)
    info_path = root / "meta" / "info.json"
    if not info_path.exists():
        raise DataError(
            f"{root} is not a sensorvla dataset (no meta/info.json)",
            path=str(info_path),
            fix="generate one with `sensorvla data synth --out DIR` or convert your recordings with "
            "`sensorvla data import-recorder` / `import-hdf5`",
        )
    try:
        info = json.loads(info_path.read_text())
        rows = pq.read_table(root / EPISODES_FILE).to_pylist()
    except (json.JSONDecodeError, OSError) as e:
        raise DataError(f"cannot read dataset metadata: {e}", path=str(info_path), fix="re-create the dataset") from e
    sv = info.get("sensorvla", {})
    for r in rows:
        r["clock_offsets"] = json.loads(r.get("clock_offsets") or "{}")
        r["instruction"] = r["tasks"][0]
    return DatasetMeta(
        root=root,
        dataset_id=sv.get("dataset_id", root.name),
        action_fps=float(info["fps"]),
        views=list(sv["views"]),
        action_dim=int(info["features"]["action"]["shape"][0]),
        state_dim=int(info["features"]["observation.state"]["shape"][0]),
        sensor_channels=int(sv.get("sensor_channels", 0)),
        force_channels=int(sv.get("force_channels", 1)),
        sensor_rate=float(sv.get("sensor_rate", 0.0)),
        image_shape=list(sv.get("image_shape", [])),
        episodes=rows,
        info=info,
    )


def read_frames(root: str | Path):
    """The per-frame parquet table (pyarrow.Table)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(root) / DATA_FILE)
