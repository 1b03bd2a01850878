"""Builders of small recorder-layout episode folders with known ground truth (tests/data/test_importers.py).

The layout is exactly the original recorder's (`<Task>/episode_<YYYYmmdd_HHMMSS>/` with metadata.json,
robot_states.csv, sensor_data.npz of overlapping 650 x 1026 windows every 200 ms, images/<View>/<ts>.jpg).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

T0 = 1_718_000_000.0  # absolute robot-clock start (epoch seconds, like the recorder)
ROBOT_HZ = 100.0
SENSOR_HZ = 650.0
WINDOW = 650
CHANNELS = 1026
HOP = 130  # 200 ms at 650 Hz: new samples between consecutive windows
HEADER = [
    "recv_timestamp",
    "origin_timestamp",
    "send_timestamp",
    "force",
    *[f"joint_{i}" for i in range(1, 7)],
    "pose_x",
    "pose_y",
    "pose_z",
    "pose_a",
    "pose_b",
    "pose_r",
]


def true_pose(t: np.ndarray, yaw0: float) -> np.ndarray:
    """(N,) seconds since T0 -> (N, 6) pose, yaw UNWRAPPED (20 deg/s: yaw0=170 crosses +180 at 0.5 s)."""
    return np.stack(
        [100 + 3 * np.sin(t), -20 + 2 * t, 150 - 4 * t**2, 10 * np.cos(t), -5 + 0.5 * t, yaw0 + 20 * t],
        axis=1,
    )


def wrap180(deg: np.ndarray) -> np.ndarray:
    return (deg + 180.0) % 360.0 - 180.0


def frame_for(view: int, i: int, hw: tuple[int, int] = (16, 20)) -> np.ndarray:
    """A smooth deterministic frame (JPEG keeps it within a few levels)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([40 * view + 4 * i + 0 * xx, 60 + 2 * xx + 0 * yy, 200 - 3 * yy + 0 * xx], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class RecorderTruth:
    """What one built episode contains, on the robot clock relative to T0."""

    path: Path
    name: str
    robot_ts: np.ndarray
    pose: np.ndarray  # unwrapped
    image_ts: dict[str, np.ndarray] = field(default_factory=dict)
    image_frames: dict[str, np.ndarray] = field(default_factory=dict)
    sensor_ts: np.ndarray | None = None
    sensor: np.ndarray | None = None
    window_ts: np.ndarray | None = None
    windows: np.ndarray | None = None


def write_robot_csv(path: Path, ts_abs: np.ndarray, pose_wrapped: np.ndarray, joints: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for t, p, j in zip(ts_abs, pose_wrapped, joints):
            t = float(t)
            w.writerow(
                [
                    repr(t + 0.002),
                    repr(t),
                    repr(t + 0.001),
                    0.0,
                    *map(repr, j.tolist()),
                    *map(repr, p.tolist()),
                ]
            )


def sensor_truth(n_windows: int, s0: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Continuous stream (ts (N,), data (N, 1026)) and the recorder's windows (ts (n,), (n, 650, 1026))."""
    n = WINDOW + HOP * (n_windows - 1)
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(n, CHANNELS)).astype(np.float32)
    data[:, 0] = np.linspace(0, 1, n, dtype=np.float32)  # force channel
    ts = s0 + np.arange(n) / SENSOR_HZ
    last = WINDOW - 1 + HOP * np.arange(n_windows)
    windows = np.stack([data[k - WINDOW + 1 : k + 1] for k in last])
    return ts, data, ts[last], windows


def build_episode(
    root: Path,
    task: str,
    stamp: str,
    *,
    seconds: float = 2.0,
    views=("View1", "View2"),
    with_sensor: bool = True,
    n_windows: int = 6,
    yaw0: float = 170.0,
    seed: int = 0,
    clock_offsets: dict | None = None,
) -> RecorderTruth:
    """Write one episode folder and return its ground truth."""
    ep = root / task / f"episode_{stamp}"
    (ep / "images").mkdir(parents=True)
    t = np.arange(int(round(seconds * ROBOT_HZ)) + 1) / ROBOT_HZ
    pose = true_pose(t, yaw0)
    wrapped = pose.copy()
    wrapped[:, 3:6] = wrap180(pose[:, 3:6])
    joints = np.stack([np.full_like(t, k) + 0.1 * t for k in range(6)], axis=1)
    write_robot_csv(ep / "robot_states.csv", T0 + t, wrapped, joints)
    truth = RecorderTruth(ep, f"{task}/episode_{stamp}", t, pose)
    for vi, v in enumerate(views):
        (ep / "images" / v).mkdir()
        stamps = [f"{T0 + 0.0123 + 0.2 * i + 0.001 * vi:.6f}" for i in range(int(seconds * 5))]
        frames = [frame_for(vi, i) for i in range(len(stamps))]
        for s, fr in zip(stamps, frames):
            Image.fromarray(fr).save(ep / "images" / v / f"{s}.jpg", quality=95)
        truth.image_ts[v] = np.array([float(s) for s in stamps]) - T0
        truth.image_frames[v] = np.stack(frames)
    if with_sensor:
        s_ts, s_data, w_ts, wins = sensor_truth(n_windows, T0 - 0.6, seed)
        np.savez(ep / "sensor_data.npz", timestamps=w_ts, data=wins)
        truth.sensor_ts, truth.sensor, truth.window_ts, truth.windows = s_ts - T0, s_data, w_ts, wins
    meta = {
        "episode_name": ep.name,
        "start_time": T0,
        "end_time": T0 + seconds,
        "camera_views": list(views)[::-1],
        "sensor_hz": SENSOR_HZ,
        "robot_hz": ROBOT_HZ,
        "sensor_window_size": WINDOW,
        "action_horizon": 8,
        "action_dim": 7,
        "camera_frames_count": 0,
        "sensor_windows_count": n_windows if with_sensor else 0,
        "robot_states_count": len(t),
    }
    if clock_offsets:
        meta["clock_offsets"] = clock_offsets
    (ep / "metadata.json").write_text(json.dumps(meta))
    return truth


def build_recorder_root(root: Path) -> list[RecorderTruth]:
    """Two tasks, one episode each: the first with sensor and a yaw wrap, the second without sensor."""
    return [
        build_episode(
            root,
            "Blue_point",
            "20240101_120000",
            yaw0=170.0,
            seed=1,
            clock_offsets={"sensor": 0.012, "images": -0.004},
        ),
        build_episode(root, "Red_point", "20240101_130000", yaw0=-10.0, with_sensor=False, seconds=1.5),
    ]
