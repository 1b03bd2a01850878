"""Helpers shared by the runner tests: robot-style observations built from the synthetic dataset."""

from __future__ import annotations

import numpy as np

from sensorvla.data.dataset import EpisodeDataset


def obs_from_dataset(ds: EpisodeDataset, idx: int, margin_s: float = 0.05) -> dict:
    """What a robot would send at the sample's frame time: raw streams, not the dataset's window."""
    raw = ds[idx]
    e, t = raw["episode_index"], raw["timestamp"]
    obs = {
        "images": np.stack(raw["images"]),
        "state": raw["state"],
        "timestamp": np.float64(t),
        "instruction": raw["instruction"],
    }
    if ds.has_sensor(e):
        ts, values = ds.sensor_stream(e)
        keep = (ts > t - ds.cfg.sensor_window_s - margin_s) & (ts <= t + 0.5)  # future samples must be ignored
        obs["sensor"] = np.asarray(values[keep])
        obs["sensor_timestamps"] = ts[keep]
    return obs


def later_samples(obs: dict, n: int = 40, rate: float = 650.0, seed: int = 0) -> dict:
    """The same scene a little later: `n` new sensor samples after the newest sent ones, query at the last."""
    ts = obs["sensor_timestamps"][-1] + np.arange(1, n + 1) / rate
    values = np.random.default_rng(seed).normal(3.0, 2.0, (n, obs["sensor"].shape[1])).astype(np.float32)
    return dict(obs, sensor=values, sensor_timestamps=ts, timestamp=np.float64(ts[-1]))
