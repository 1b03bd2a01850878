"""Test helpers: read a written dataset's streams back by name, whatever the image storage."""

from __future__ import annotations

import numpy as np

from sensorvla.data.layout import CAMERA_PREFIX, STATE_KEY


def stream(meta, e: int, name: str) -> np.ndarray:
    """`sensor`, `state`, `image_<view>` (+ `_timestamps`) of episode e as written (own clocks)."""
    timestamps = name.endswith("_timestamps")
    base = name[: -len("_timestamps")] if timestamps else name
    if base == "state":
        key = STATE_KEY
    elif base.startswith("image_"):
        key = CAMERA_PREFIX + base[len("image_") :]
    else:
        key = base
    s = meta.streams[key]
    if timestamps:
        return np.asarray(s.timestamps(e))
    if s.kind == "timing":  # video frames: decode the episode
        from sensorvla.data.source import LeRobotSource

        frames = LeRobotSource.open(meta.root).load(e).images[base[len("image_") :]].frames
        return np.stack([frames[j] for j in range(len(frames))])
    return np.asarray(s.values(e))
