"""Importer for the original recorder's episode folders (`<Task>/episode_<YYYYmmdd_HHMMSS>/`).

Each folder holds metadata.json, robot_states.csv (100 Hz poses), sensor_data.npz (overlapping 650-sample
windows every 200 ms) and images/<View>/<capture_ts>.jpg. They become `EpisodeData` (continuous sensor
stream, unwrapped pose state, 10 Hz pose-delta actions) and then the native format (docs/hdf5-format.md §2).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.data.importers._common import (
    ImageSize,
    check_one_sensor_setting,
    decode_jpeg,
    pose_delta_actions,
    read_numeric_csv,
    select_views,
    size_hw,
    stack_frames,
)
from sensorvla.data.importers.base import ImportSource, run_import
from sensorvla.data.importers.recorder_sensor import iter_npz_windows, rebuild_sensor_stream
from sensorvla.data.types import (
    DataError,
    EpisodeData,
    ImageStream,
    Stream,
    as_data_error,
    check_increasing,
    error_text,
)

logger = logging.getLogger(__name__)

ACTION_FPS = 10.0
TOOL_FLAG = 1.0  # the original's constant 7th action channel ("gripper" = 1.0), kept so D_a = 7 everywhere
POSE_COLUMNS = ["pose_x", "pose_y", "pose_z", "pose_a", "pose_b", "pose_r"]
JOINT_COLUMNS = [f"joint_{i}" for i in range(1, 7)]
POSE_NAMES = ["x_mm", "y_mm", "z_mm", "a_deg", "b_deg", "r_deg"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
REQUIRED_FILES = ("metadata.json", "robot_states.csv")
# the DataError (message, fix) when no episode has a camera view
NO_VIEWS = (
    "no camera views found (images/<View>/ folders)",
    "every episode needs at least one images/<View>/ folder of <timestamp>.jpg frames",
)
ACTION_SEMANTICS = (
    "per-100ms pose deltas [dx,dy,dz mm; da,db,dr deg of the unwrapped Meca500 XYZ Euler angles; tool = constant 1.0]"
)


@dataclass
class RecorderEpisode:
    """One episode folder found by `scan_recorder` (cheap: no arrays read yet)."""

    path: Path
    task: str
    name: str
    metadata: dict[str, Any]
    views: list[str] = field(default_factory=list)


# --- discovery ------------------------------------------------------------------------------------------
def _is_episode_dir(p: Path) -> bool:
    return p.is_dir() and (p.name.startswith("episode_") or (p / "metadata.json").is_file())


def find_episode_dirs(src: str | Path) -> list[Path]:
    """Episode folders under `src`: the folder itself, `src/episode_*`, or `src/<Task>/episode_*` (sorted)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(
            "source folder does not exist",
            path=str(src),
            fix="pass the recorder's New_dataset folder, a <Task> folder or one episode folder",
        )
    if _is_episode_dir(src):
        return [src]
    found = []
    for child in sorted(p for p in src.iterdir() if p.is_dir()):
        if _is_episode_dir(child):
            found.append(child)
        else:
            found.extend(sorted(g for g in child.iterdir() if _is_episode_dir(g)))
    if not found:
        raise DataError(
            "no episode folders (episode_*/ with metadata.json) found",
            path=str(src),
            fix="point the importer at New_dataset/, New_dataset/<Task>/ or one episode_*/ folder",
        )
    return found


def _list_views(ep_dir: Path) -> list[str]:
    img = ep_dir / "images"
    return sorted(p.name for p in img.iterdir() if p.is_dir()) if img.is_dir() else []


def read_metadata(ep_dir: Path, episode: str) -> dict[str, Any]:
    """Parse metadata.json; DataError when missing, unreadable or not a JSON object."""
    path = ep_dir / "metadata.json"
    with as_data_error(
        (OSError, UnicodeDecodeError, json.JSONDecodeError),
        lambda e: f"cannot read metadata ({error_text(e)})",
        episode=episode,
        path=path,
        fix="restore metadata.json (it needs at least sensor_hz and sensor_window_size, or {} for the defaults "
        "650/650)",
    ):
        meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise DataError(
            "metadata.json is not a JSON object",
            episode=episode,
            path=str(path),
            fix="restore metadata.json from the recorder output",
        )
    return meta


def scan_recorder(src: str | Path, views: Sequence[str] | None = None) -> list[RecorderEpisode]:
    """Find every episode and check what can be checked without reading arrays (files, views, rates).

    Raises DataError before anything is written when a required file is missing or the episodes do not
    share the same camera views.
    """
    episodes = []
    for ep_dir in find_episode_dirs(src):
        task = ep_dir.parent.name
        name = f"{task}/{ep_dir.name}"
        for f in REQUIRED_FILES:
            if not (ep_dir / f).is_file():
                raise DataError(
                    f"missing {f}",
                    episode=name,
                    path=str(ep_dir / f),
                    fix="restore the file from the recorder output or move the episode folder out of the source folder",
                )
        meta = read_metadata(ep_dir, name)
        found = _list_views(ep_dir)
        for v in meta.get("camera_views") or []:
            if v not in found:
                raise DataError(
                    f"metadata lists view {v!r} but images/{v}/ is missing (found {found})",
                    episode=name,
                    path=str(ep_dir / "images" / str(v)),
                    fix="restore the view's frames, or import only the views every episode has "
                    "with views=[...] (--views)",
                )
        episodes.append(RecorderEpisode(ep_dir, task, name, meta, found))
    select_views(episodes, views, src=src, images_of=lambda e: e.path / "images", none_found=NO_VIEWS)
    rates = {float(e.metadata.get("sensor_hz", 650.0)) for e in episodes}
    check_one_sensor_setting(rates, "episodes have different sensor_hz", src)
    return episodes


# --- robot states ---------------------------------------------------------------------------------------
def read_robot_states(path: Path, episode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """robot_states.csv -> origin timestamps (N,), pose (N, 6) with unwrapped angles, joints (N, 6).

    Rows with a repeated origin_timestamp (the robot clock is refreshed every 5 ms and rounded to 1 ms) are
    dropped, keeping the first; a timestamp that goes backwards is an error.
    """
    fix = "re-export robot_states.csv from the recorder, or move the episode out of the source folder"
    header, table = read_numeric_csv(path, what="robot CSV", fix=fix, episode=episode)
    need = ["origin_timestamp", *JOINT_COLUMNS, *POSE_COLUMNS]
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(
            f"robot CSV lacks column(s) {missing} (header: {header[:20]})",
            episode=episode,
            path=str(path),
            fix=fix,
        )
    if len(table) < 2:
        raise DataError(
            f"robot CSV has {len(table)} rows; at least 2 are needed for actions",
            episode=episode,
            path=str(path),
            fix=fix,
        )
    cols = {c: header.index(c) for c in need}
    ts = table[:, cols["origin_timestamp"]]
    pose = table[:, [cols[c] for c in POSE_COLUMNS]]
    joints = table[:, [cols[c] for c in JOINT_COLUMNS]]
    bad_rows = ~np.isfinite(np.column_stack([ts, pose, joints])).all(axis=1)
    if bad_rows.any():
        i = int(np.argmax(bad_rows))
        raise DataError(f"robot CSV line {i + 2} has NaN/inf values", episode=episode, path=str(path), fix=fix)
    d = np.diff(ts)
    if np.any(d < 0):
        i = int(np.argmax(d < 0))
        raise DataError(
            f"origin_timestamp goes backwards at lines {i + 2} -> {i + 3} ({ts[i]:.6f} -> {ts[i + 1]:.6f})",
            episode=episode,
            path=str(path),
            fix="sort the CSV by origin_timestamp, or fix the robot PC clock and re-record",
        )
    keep = np.concatenate([[True], d > 0])
    if not keep.all():
        logger.warning("%s: dropped %d robot rows with a repeated origin_timestamp", episode, int((~keep).sum()))
    ts, pose, joints = ts[keep], pose[keep], joints[keep]
    if len(ts) < 2:
        raise DataError("robot CSV has fewer than 2 distinct timestamps", episode=episode, path=str(path), fix=fix)
    pose = pose.copy()
    # Euler angles jump +-360 deg at the +-180 boundary; unwrapping keeps state and deltas continuous.
    pose[:, 3:6] = np.unwrap(pose[:, 3:6], period=360.0, axis=0)
    return ts, pose, joints


# --- images ---------------------------------------------------------------------------------------------
def read_view(view_dir: Path, episode: str, hw: tuple[int, int] | None) -> ImageStream:
    """images/<View>/<capture_ts>.jpg -> ImageStream (timestamps from the file names, frames RGB uint8)."""
    files = []
    for p in view_dir.iterdir():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        with as_data_error(
            ValueError,
            f"image name {p.name!r} is not a <capture_timestamp>{p.suffix}",
            episode=episode,
            path=p,
            fix="rename the frame to its capture time (e.g. 1718000000.123456.jpg) or remove it",
        ):
            files.append((float(p.stem), p))
    if not files:
        raise DataError(
            f"view {view_dir.name} has no frames",
            episode=episode,
            path=str(view_dir),
            fix="restore the frames or import only the other views with views=[...] (--views)",
        )
    files.sort()
    ts = np.array([t for t, _ in files], np.float64)
    check_increasing(ts, what=f"image {view_dir.name}", episode=episode, path=view_dir)
    frames = [decode_jpeg(p, hw, episode=episode) for _, p in files]
    return ImageStream(ts, stack_frames(frames, view=view_dir.name, episode=episode, path=view_dir))


# --- one episode ----------------------------------------------------------------------------------------
def _clock_offsets(meta: dict[str, Any], views: Sequence[str], episode: str, path: Path) -> dict[str, float]:
    """metadata["clock_offsets"] (optional, seconds added to reach the common clock) -> per-stream offsets.

    Keys: "robot" (or "state"/"action"), "sensor", "images" (every view) and "image.<View>" / "<View>".
    """
    raw = meta.get("clock_offsets") or {}
    with as_data_error(
        (TypeError, ValueError),
        f"clock_offsets must map stream -> seconds, got {meta.get('clock_offsets')!r}",
        episode=episode,
        path=path,
        fix='e.g. "clock_offsets": {"sensor": 0.012}',
    ):
        raw = {str(k): float(v) for k, v in dict(raw).items()}
    robot = raw.get("robot", raw.get("state", raw.get("action", 0.0)))
    out = {"state": robot, "action": robot, "sensor": raw.get("sensor", 0.0)}
    for v in views:
        out[f"image.{v}"] = raw.get(f"image.{v}", raw.get(v, raw.get("images", 0.0)))
    return out


def instruction_for(task: str, meta: dict[str, Any], instruction: str | None) -> str:
    """--instruction, else metadata["instruction"], else "Perform <Task> insertion task" (_ -> space)."""
    if instruction:
        return instruction
    if isinstance(meta.get("instruction"), str) and meta["instruction"].strip():
        return meta["instruction"].strip()
    return f"Perform {task.replace('_', ' ')} insertion task"


def load_recorder_episode(
    ep: RecorderEpisode,
    *,
    instruction: str | None = None,
    image_size: ImageSize = None,
    include_joints: bool = False,
) -> EpisodeData:
    """Read one episode folder into EpisodeData.

    All streams are shifted by the same constant t0 (the first robot origin_timestamp, kept in
    extra["time_origin_unix"]) so timestamps are small numbers; relative timing is untouched.
    State is (N_st, 6) [x, y, z mm, a, b, r deg unwrapped], or (N_st, 12) with the 6 joint angles appended
    when `include_joints`. Actions are (N_a, 7) 10 Hz pose deltas + tool flag (see `pose_delta_actions`).
    """
    name, meta = ep.name, ep.metadata
    rate = float(meta.get("sensor_hz", 650.0))
    window = int(meta.get("sensor_window_size", 650))
    ts, pose, joints = read_robot_states(ep.path / "robot_states.csv", name)
    t0 = float(ts[0])
    ts = ts - t0
    action_ts, actions = pose_delta_actions(ts, pose, fps=ACTION_FPS, tool=TOOL_FLAG)
    state = np.concatenate([pose, joints], axis=1) if include_joints else pose
    offsets = _clock_offsets(meta, ep.views, name, ep.path / "metadata.json")
    streams = {
        "action": Stream(action_ts, actions, offsets["action"]),
        "state": Stream(ts, state.astype(np.float32), offsets["state"]),
    }
    hw = size_hw(image_size)
    for v in ep.views:
        view = read_view(ep.path / "images" / v, name, hw)
        streams[f"image.{v}"] = Stream(view.timestamps - t0, view.frames, offsets[f"image.{v}"])
    extra: dict[str, Any] = {
        "source": "recorder",
        "source_path": str(ep.path),
        "time_origin_unix": t0,
        "task": ep.task,
    }
    npz_path = ep.path / "sensor_data.npz"
    if npz_path.is_file():
        w_ts, wins = iter_npz_windows(npz_path, name, window)
        s_ts, s_data, mismatches = rebuild_sensor_stream(w_ts, wins, rate=rate, episode=name, path=npz_path)
        if len(s_ts):
            streams["sensor"] = Stream(s_ts - t0, s_data, offsets["sensor"])
            extra["sensor_overlap_mismatch_windows"] = mismatches
            if mismatches:
                logger.warning(
                    "%s: %d of %d sensor windows do not overlap their predecessor sample for sample; "
                    "the %g Hz nominal-rate timing assumption is off there",
                    name,
                    mismatches,
                    len(w_ts),
                    rate,
                )
        else:
            logger.warning("%s: sensor_data.npz has no windows; importing without sensor", name)
    else:
        logger.info("%s: no sensor_data.npz; importing without sensor", name)
    return EpisodeData.from_streams(name, instruction_for(ep.task, meta, instruction), streams, extra)


# --- whole import ---------------------------------------------------------------------------------------
def scan_recorder_source(
    src: str | Path,
    *,
    views: Sequence[str] | None = None,
    instruction: str | None = None,
    image_size: ImageSize = None,
    include_joints: bool = False,
) -> ImportSource:
    """The recorder episode folders under `src` as an import source (files and views checked; no arrays)."""
    src = Path(src)
    episodes = scan_recorder(src, views)
    meta0 = episodes[0].metadata
    state_names = POSE_NAMES + ([f"joint_{i}_deg" for i in range(1, 7)] if include_joints else [])
    return ImportSource(
        kind="recorder",
        items=episodes,
        loader=lambda e: load_recorder_episode(
            e, instruction=instruction, image_size=image_size, include_joints=include_joints
        ),
        action_fps=ACTION_FPS,
        default_id=f"recorder_{src.name}",
        info={
            "sensor_rate": float(meta0.get("sensor_hz", 650.0)),
            "force_channels": 1,
            "sensor_window_assumption": "sample k of window n at ts_n - (W-1-k)/rate",
            "state_rate": float(meta0.get("robot_hz", 100.0)),
            "state_names": state_names,
            "action_semantics": ACTION_SEMANTICS,
        },
    )


def import_recorder(src: str | Path, out_dir: str | Path, *, include_joints: bool = False, **options: Any) -> Path:
    """Convert recorder episode folders into a sensorvla dataset at `out_dir` (`run_import`).

    Args:
        src: New_dataset/ (with <Task>/episode_*/), one <Task>/ folder, or one episode_*/ folder.
        out_dir: the dataset to create.
        include_joints: append the 6 joint angles to the state (D_st = 12 instead of 6).
        options: `dataset_id` (default "recorder_<src folder name>"), `progress`, and the `ImportOptions`
            (`instruction` default: per task, see `instruction_for`; `image_size` None keeps the native size,
            and 1280x720 is large).
    """
    scan = functools.partial(scan_recorder_source, include_joints=include_joints)
    return run_import(scan, src, out_dir, **options)
