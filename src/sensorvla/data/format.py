"""The dataset format: a LeRobot v3 dataset, plus sensorvla's own-rate streams as a declared sidecar.

    meta/info.json                    LeRobot's: codebase_version "v3.0", integer fps (= the action rate),
                                      features, totals, data_path, video_path. sensorvla adds one key,
                                      "sensorvla" (LeRobot ignores it): dataset id, views, rates and the
                                      sidecar streams, see `sensorvla.data.sidecar`.
    meta/tasks.parquet                task_index, indexed by the task string (LeRobot's layout)
    meta/episodes/chunk-*/file-*.parquet   one row per episode: the v3 columns (dataset_from_index,
                                      dataset_to_index, data/*, videos/<key>/*) + sensorvla's name, extra
    meta/stats.json                   LeRobot-layout statistics; meta/norm_stats.json: ours (fingerprinted)
    data/chunk-*/file-*.parquet       one row per action frame: action, observation.state, timestamp
                                      (= frame_index / fps), frame_index, episode_index, index, task_index,
                                      image-dtype cameras, any extra per-frame features
    videos/<key>/chunk-*/file-*.mp4   video cameras; an episode spans [from_timestamp, to_timestamp)
    streams/<key>/...                 the sidecar: own-rate timestamps (+ values), memory-mapped .npy

`load_meta` reads any local v3 folder written by the `lerobot` library or by us; see docs/data-format.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.layout import (
    ACTION_KEY,
    CAMERA_PREFIX,
    INFO_FILE,
    ROW_KEYS,
    STATE_KEY,
    TASKS_FILE,
    V21_FIX,
)
from sensorvla.data.types import DataError
from sensorvla.streams import StreamSpec, parse_stream

logger = logging.getLogger(__name__)


@dataclass
class Camera:
    """One camera: its view name, its LeRobot feature key, where the frames live and their shape."""

    view: str
    key: str
    storage: str  # "video" (mp4 under videos/), "image" (PNG bytes in the parquet), "npy" (sidecar frames)
    shape: tuple[int, int, int]


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
    cameras: dict[str, Camera] = field(default_factory=dict)  # view -> camera
    tasks: list[str] = field(default_factory=list)  # task_index -> task string
    sensor_keys: list[str] = field(default_factory=list)  # the sensor source: sidecar stream or per-frame keys
    streams: dict[str, Any] = field(default_factory=dict)  # sidecar stream key -> SidecarStream

    @property
    def fps(self) -> int:
        """LeRobot's integer fps (the action rate)."""
        return int(self.info["fps"])

    def resolve_streams(self, declared) -> tuple[StreamSpec, ...]:
        """The declared sensor streams with the dataset's shapes and rates (`resolve_streams`)."""
        return resolve_streams(self, declared)


def _err(msg: str, path: Path, fix: str) -> DataError:
    return DataError(msg, path=str(path), fix=fix)


def read_info(root: str | Path) -> dict[str, Any]:
    """meta/info.json, after the version check (v2.x names LeRobot's conversion command)."""
    root = Path(root)
    path = root / INFO_FILE
    if not path.exists():
        raise _err(
            f"{root} is not a sensorvla or LeRobot v3 dataset (no meta/info.json)",
            path,
            "generate one with `sensorvla data synth --out DIR`, convert your recordings with "
            "`sensorvla data import-recorder` / `import-hdf5`, or point --dataset_dir at a LeRobot v3 folder",
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _err(f"cannot read dataset metadata: {e}", path, "re-create the dataset") from e
    version = str(info.get("codebase_version", "?"))
    m = re.fullmatch(r"v(\d+)\.(\d+)", version)
    if m and m.group(1) == "2":
        raise _err(f"LeRobot dataset of version {version}; sensorvla reads v3.0", path, V21_FIX.format(root=root))
    if not m or m.group(1) != "3":
        raise _err(
            f"unsupported codebase_version {version!r} (sensorvla reads LeRobot v3.0)",
            path,
            "write the dataset with lerobot 0.4.x (v3.0), or convert it to v3.0",
        )
    sv = info.get("sensorvla", {})
    if "views" in sv and "streams" not in sv and (root / "streams").is_dir():
        raise _err(
            "written by an older sensorvla (per-episode streams/episode_* folders, no video features)",
            path,
            "re-create it with this version (`sensorvla data synth` or the importer you used)",
        )
    if not isinstance(info.get("features"), dict) or ACTION_KEY not in info["features"]:
        found = sorted(info.get("features", {})) if isinstance(info.get("features"), dict) else None
        raise _err(
            f"the dataset has no {ACTION_KEY!r} feature (features: {found})",
            path,
            "record the commanded action as the `action` feature (shape (D_a,)), as LeRobot datasets do",
        )
    return info


def _read_parquets(root: Path, pattern: str, what: str, columns: list[str] | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(root.glob(pattern))
    if not files:
        raise _err(f"no {what} files ({pattern})", root / pattern, "re-create the dataset; its files are missing")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=columns))
        except (OSError, pa.ArrowException) as e:
            raise _err(f"cannot read {what} ({type(e).__name__}: {e})", f, "re-create the dataset") from e
    return files, pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def read_tasks(root: Path) -> list[str]:
    """task_index -> task string. LeRobot keeps the string as the (pandas) index of meta/tasks.parquet."""
    import pyarrow.parquet as pq

    path = root / TASKS_FILE
    if not path.exists():
        raise _err("meta/tasks.parquet is missing", path, "re-create the dataset")
    table = pq.read_table(path)
    names = table.column_names
    if "task" in names:
        col = "task"
    else:
        pandas_meta = table.schema.pandas_metadata or {}
        index_cols = [c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)]
        col = next((c for c in index_cols if c in names), "__index_level_0__")
        if col not in names:
            raise _err(f"meta/tasks.parquet has no task strings (columns {names})", path, "re-create the tasks table")
    tasks = dict(zip(table.column("task_index").to_pylist(), table.column(col).to_pylist()))
    return [tasks[i] for i in range(len(tasks))]


def select_cameras(info: dict[str, Any], root: Path) -> dict[str, Camera]:
    """Every image/video feature (and sidecar frame stream) as a Camera, keyed by view name."""
    cams: dict[str, Camera] = {}
    sidecar = info.get("sensorvla", {}).get("streams", {})
    for key, ft in info["features"].items():
        if ft.get("dtype") not in ("video", "image"):
            continue
        shape = tuple(int(x) for x in ft.get("shape", ()))
        names = ft.get("names") or []
        if len(shape) == 3 and shape[0] == 3 and list(names)[:1] == ["channels"]:  # channel-first declaration
            shape = (shape[1], shape[2], shape[0])
        if len(shape) != 3 or shape[2] != 3 or ft.get("info", {}).get("video.is_depth_map"):
            raise _err(
                f"camera {key!r} has shape {list(shape)} (dtype {ft['dtype']}); sensorvla reads RGB (h, w, 3) cameras",
                root / INFO_FILE,
                "drop depth/grey cameras from --data.views, or convert them to 3-channel RGB",
            )
        view = key[len(CAMERA_PREFIX) :] if key.startswith(CAMERA_PREFIX) else key
        cams[view] = Camera(view, key, ft["dtype"], shape)
    for key, spec in sidecar.items():
        if spec.get("kind") == "frames":
            view = key[len(CAMERA_PREFIX) :] if key.startswith(CAMERA_PREFIX) else key
            cams[view] = Camera(view, key, "npy", tuple(spec["shape"]))
    return cams


def frame_features(info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Extra per-frame float `observation.*` features (other than the state and the cameras) -> per-frame shape;
    a scalar is (1,)."""
    out = {}
    for key, ft in info["features"].items():
        if key in (STATE_KEY, ACTION_KEY) or key in ROW_KEYS or ft.get("dtype") in ("video", "image", "string"):
            continue
        if key.startswith("observation.") and str(ft.get("dtype", "")).startswith("float"):
            out[key] = tuple(int(n) for n in ft.get("shape") or ()) or (1,)
    return out


def per_frame_sensor_keys(info: dict[str, Any]) -> list[str]:
    """Extra per-frame float features usable as the low-rate sensor tensor (e.g. observation.force): scalars and
    vectors, sorted. A 2-D one (a tactile array, a depth map) is a stream of its own (`--data.streams`)."""
    return sorted(k for k, shape in frame_features(info).items() if len(shape) == 1)


def _name_2d_features(info: dict[str, Any]) -> None:
    """Log each per-frame 2-D feature with the `--data.streams` line that reads it (it is no part of the tensor)."""
    for key, shape in frame_features(info).items():
        if len(shape) > 1:
            name = key.removeprefix("observation.")
            logger.warning(
                "per-frame feature %s %s is a %d-D array: it is not part of the sensor tensor; read it as a stream "
                "with --data.streams '%s=taxel2d,source=%s'",
                *(key, shape, len(shape), name, key),
            )


def resolve_streams(meta: DatasetMeta, declared) -> tuple[StreamSpec, ...]:
    """The declared streams (StreamSpec or their one-line form) with shapes and rates from the dataset; none declared:
    the sidecar streams that declare an `encoder` (other than the sensor tensor's). DataError naming the stream, the
    dataset's streams and the fix when a source is missing or its shape or rate disagrees."""
    specs = [s if isinstance(s, StreamSpec) else parse_stream(s) for s in declared]
    if not specs:
        specs = [
            StreamSpec(k, str(s.extra["encoder"]), source=k)
            for k, s in meta.streams.items()
            if s.kind == "values" and "encoder" in s.extra and k not in meta.sensor_keys
        ]
    sidecar = {
        k: (tuple(s.shape) or (1,), float(s.rate_hz or 0)) for k, s in meta.streams.items() if s.kind == "values"
    }
    frames = {k: (shape, float(meta.info["fps"])) for k, shape in frame_features(meta.info).items()}
    out = []
    for spec in specs:
        if not spec.source:
            out.append(spec)
            continue
        if spec.source not in sidecar and spec.source not in frames:
            raise _err(
                f"stream {spec.name!r} reads {spec.source!r}, which the dataset does not have (sidecar streams: "
                f"{sorted(sidecar)}, per-frame float features: {sorted(frames)})",
                meta.root / INFO_FILE,
                "set source= to one of them, or attach the sensor with `sensorvla data add-sensor`",
            )
        shape, rate = sidecar.get(spec.source) or frames[spec.source]
        if spec.channels is not None:
            if len(shape) != 1 or spec.channels[1] > shape[0]:
                raise _err(
                    f"stream {spec.name!r}: channels {spec.channels} do not fit {spec.source!r} of shape {shape}",
                    meta.root / INFO_FILE,
                    "slice channels A:B of a vector source within its width",
                )
            shape = (spec.channels[1] - spec.channels[0],)
        if spec.shape and spec.shape != shape or spec.rate_hz and rate and abs(spec.rate_hz / rate - 1) > 0.25:
            raise _err(
                f"stream {spec.name!r} declares shape {spec.shape} at {spec.rate_hz:g} Hz, {spec.source!r} holds "
                f"{shape} at {rate:g} Hz",
                meta.root / INFO_FILE,
                "leave shape= and rate= out (they are read from the dataset), or point source= at the right stream",
            )
        out.append(dataclasses.replace(spec, shape=shape, rate_hz=spec.rate_hz or rate))
    return tuple(out)


def resolve_sensor_keys(info: dict[str, Any], streams: dict, wanted, root: Path) -> list[str]:
    """The sensor source. Auto (empty `wanted`): the sidecar "sensor" stream, else the only sidecar values
    stream that is no state and declares no encoder, else every per-frame sensor feature. Explicit: one sidecar
    stream, or per-frame features (concatenated)."""
    value_streams = [k for k, s in streams.items() if s.kind == "values" and k != STATE_KEY]
    frame_keys = per_frame_sensor_keys(info)
    if not wanted:
        if "sensor" in streams:
            return ["sensor"]
        plain = [k for k in value_streams if "encoder" not in streams[k].extra]  # the others are streams of their own
        if len(plain) == 1:
            return plain
        return frame_keys
    wanted = list(wanted)
    unknown = [k for k in wanted if k not in value_streams and k not in frame_keys]
    if unknown:
        raise _err(
            f"--data.sensor-keys {unknown} not in the dataset (sidecar streams: {value_streams}, "
            f"per-frame sensor features: {frame_keys})",
            root / INFO_FILE,
            "pick keys the dataset has, or attach a stream with `sensorvla data add-sensor`",
        )
    if any(k in value_streams for k in wanted) and len(wanted) > 1:
        raise _err(
            f"--data.sensor-keys {wanted} mixes a sidecar stream with other keys (they have different clocks)",
            root / INFO_FILE,
            "use one sidecar stream, or only per-frame features",
        )
    return wanted


def _stream_name(key: str, sensor_keys: list[str]) -> str:
    """A sidecar key as EpisodeData names its clock offsets: action, state, image.<view>, sensor."""
    if key == STATE_KEY:
        return "state"
    if key.startswith(CAMERA_PREFIX):
        return "image." + key[len(CAMERA_PREFIX) :]
    return "sensor" if sensor_keys == [key] else key


def load_meta(root: str | Path, sensor_keys=None) -> DatasetMeta:
    """Read meta/ of any LeRobot v3 dataset (ours or lerobot's); DataError with the fix when it is not one.

    Args:
        root: the dataset folder.
        sensor_keys: which sensor source to use (`--data.sensor-keys`); None/empty = automatic.
    """
    from sensorvla.data.sidecar import load_streams

    root = Path(root)
    info = read_info(root)
    sv = info.get("sensorvla", {})
    _, ep_table = _read_parquets(root, "meta/episodes/*/*.parquet", "episode metadata")
    rows = sorted(
        [{k: v for k, v in r.items() if not k.startswith("stats/")} for r in ep_table.to_pylist()],
        key=lambda r: r["episode_index"],
    )
    if [r["episode_index"] for r in rows] != list(range(len(rows))):
        raise _err(
            f"episode indices are not 0..{len(rows) - 1}",
            root / "meta/episodes",
            "re-create the episode metadata (LeRobot numbers episodes consecutively)",
        )
    tasks = read_tasks(root)
    streams = load_streams(root, info, rows)
    cams = select_cameras(info, root)
    keys = resolve_sensor_keys(info, streams, sensor_keys, root)
    feats = info["features"]
    _name_2d_features(info)
    if len(keys) == 1 and keys[0] in streams:
        s = streams[keys[0]]
        channels, rate = int(np.prod(s.shape)), float(s.rate_hz or 0.0)
        force = int(s.extra.get("force_channels", channels))
        with_sensor = set(s.episodes)
    else:
        channels = sum(frame_features(info)[k][0] for k in keys)
        rate, force = float(info["fps"]), channels
        with_sensor = set(range(len(rows))) if keys else set()
    for r in rows:
        e = r["episode_index"]
        r.setdefault("name", f"episode_{e:06d}")
        r["instruction"] = (r.get("tasks") or [""])[0]
        r["has_sensor"] = e in with_sensor
        r["clock_offsets"] = {_stream_name(k, keys): s.offset(e) for k, s in streams.items() if s.has(e)}
    action = feats[ACTION_KEY]
    if len(action.get("shape", ())) != 1:
        raise _err(
            f"feature 'action' has shape {action.get('shape')}; sensorvla needs a vector (D_a,)",
            root / INFO_FILE,
            "flatten the action to one vector per frame",
        )
    state = feats.get(STATE_KEY, {"shape": [0]})
    first_cam = next(iter(cams.values()), None)
    return DatasetMeta(
        root=root,
        dataset_id=sv.get("dataset_id", root.name),
        action_fps=float(sv.get("action_fps", info["fps"])),
        views=sorted(cams),
        action_dim=int(action["shape"][0]),
        state_dim=int(state["shape"][0]),
        sensor_channels=channels,
        force_channels=force if channels else int(sv.get("force_channels", 1)),
        sensor_rate=rate if channels else 0.0,
        image_shape=list(first_cam.shape) if first_cam else [],
        episodes=rows,
        info=info,
        cameras=cams,
        tasks=tasks,
        sensor_keys=keys,
        streams=streams,
    )


def read_frames(root: str | Path, columns: list[str] | None = None):
    """The per-frame table of every data parquet file, concatenated (pyarrow.Table)."""
    return _read_parquets(Path(root), "data/*/*.parquet", "frame data", columns)[1]


def column_array(table, key: str, width: int | None = None, dtype=np.float32) -> np.ndarray:
    """A fixed-size-list (or scalar) parquet column -> numpy (N, width) / (N,), without Python lists."""
    import pyarrow as pa

    def is_list(arr) -> bool:
        return pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)

    col = table.column(key).combine_chunks()
    if is_list(col):
        n, flat = len(col), col
        while is_list(flat):  # a 2-D feature: rows of rows
            flat = flat.flatten()
        flat = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype)
        w = width if width is not None else (flat.size // n if n else 0)
        if flat.size != n * w:
            raise DataError(f"column {key!r} has rows of different lengths", fix="re-create the dataset")
        return flat.reshape(n, w)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype)


# the writer lives in writer.py; these names stay importable from here
from sensorvla.data.writer import validate_episode, write_dataset  # noqa: E402

__all__ = [
    "DatasetMeta",
    "Camera",
    "load_meta",
    "read_frames",
    "read_info",
    "validate_episode",
    "write_dataset",
    "column_array",
]
