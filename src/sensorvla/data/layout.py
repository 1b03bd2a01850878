"""File names and feature keys of the on-disk format (LeRobot v3 + the sensorvla sidecar); no I/O here."""

from __future__ import annotations

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_FILE = EPISODES_PATH.format(chunk_index=0, file_index=0)
TASKS_FILE = "meta/tasks.parquet"
INFO_FILE = "meta/info.json"
CAMERA_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"
ROW_KEYS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
ACTION_NAMES_7 = ["dx_mm", "dy_mm", "dz_mm", "droll_deg", "dpitch_deg", "dyaw_deg", "tool"]
V21_FIX = (
    "convert it with LeRobot first: `python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 "
    "--repo-id=<repo_id> --root={root} --push-to-hub=false`"
)
