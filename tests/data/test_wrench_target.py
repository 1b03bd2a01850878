"""The wrench output's target: the force channels at the action chunk's times, causal, masked past the episode end
and in sensor gaps, on a hand-built timeline; normalized with the sensor's statistics and back."""

from __future__ import annotations

import numpy as np
import pytest

from sensorvla.config import DataConfig
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import write_dataset
from sensorvla.data.normalize import Normalizer, compute_stats
from sensorvla.data.timeline import SensorWindow, hold_at
from sensorvla.data.types import EpisodeData, Stream

FPS, N_A, H = 10.0, 12, 4
SENSOR_SHIFT = 0.003  # the sensor samples sit 3 ms before each 10 ms tick: the held sample is never exactly at t
GAP = (0.45, 0.62)  # no sensor samples in between (seconds, common clock)
OFFSET = -0.25  # the sensor's own clock is 0.25 s ahead of the common clock (own + offset = common)


def _episode(name: str) -> EpisodeData:
    """Actions at 10 Hz; the sensor at 100 Hz whose force channel encodes its sample's time (1000 x t, common
    clock), a second channel (a profile bin) -t, a gap, and a clock offset."""
    t = np.arange(N_A) / FPS
    ts = np.arange(0, 130) / 100.0 - SENSOR_SHIFT
    ts = ts[(ts >= 0) & ~((ts > GAP[0]) & (ts < GAP[1]))]
    values = np.stack([1000.0 * ts, -ts], axis=1).astype(np.float32)
    frames = np.zeros((N_A, 8, 8, 3), np.uint8)
    streams = {
        "action": Stream(t, np.tile(np.arange(N_A, dtype=np.float32)[:, None], (1, 3))),
        "state": Stream(t, np.zeros((N_A, 2), np.float32)),
        "image.front": Stream(t, frames),
        "sensor": Stream(ts - OFFSET, values, OFFSET),
    }
    return EpisodeData.from_streams(name, "push", streams)


@pytest.fixture(scope="module")
def timeline_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wrench_timeline") / "ds"
    return write_dataset(
        [_episode("a"), _episode("b")],
        out,
        dataset_id="wrench_timeline",
        action_fps=FPS,
        progress=False,
        image_format="npy",
        extra_info={"force_channels": 1, "sensor_rate": 100.0},
    )


def test_the_target_is_the_held_force_at_each_action_time(timeline_dir):
    ds = EpisodeDataset(timeline_dir, DataConfig(dataset_dir=str(timeline_dir), horizon=H), split="all")
    assert ds.wrench_channels == 1 and ds.max_gap_s == pytest.approx(0.02)
    checked = 0
    for idx in range(len(ds)):
        s = ds[idx]
        i, t0 = s["frame_index"], s["timestamp"]
        assert s["wrench_target"].shape == (H, 1) and s["wrench_target_mask"].shape == (H,)
        for k in range(H):
            t = t0 + k / FPS
            # t = 0: no sample yet (the first is at 7 ms); 0.5, 0.6: the newest is at 0.447 s, older than the 20 ms rule
            in_gap = round(t, 6) in (0.0, 0.5, 0.6)
            valid = i + k < N_A and not in_gap
            assert bool(s["wrench_target_mask"][k]) == valid, (i, k, t)
            if valid:  # the newest sample at or before t: 3 ms earlier, never a later one
                assert s["wrench_target"][k, 0] == pytest.approx(1000.0 * (t - SENSOR_SHIFT), abs=1e-2), (i, k)
                checked += 1
            else:
                assert s["wrench_target"][k, 0] == 0.0
    assert checked > 50
    last = ds[N_A - 2]  # two actions left in the episode: two measured steps, two masked
    assert last["wrench_target_mask"].tolist() == [True, True, False, False]
    assert last["action_mask"].tolist() == [True, True, False, False]


def test_hold_at_is_the_sensor_windows_last_grid_point():
    """Property: on random streams with gaps, `hold_at` at t equals the window ending at t at its last point, and it
    never reads a sample after t (changing every later sample changes nothing)."""
    rng = np.random.default_rng(0)
    window = SensorWindow(window_s=0.05, samples=8, max_gap_s=0.01)
    for _ in range(30):
        ts = np.sort(rng.uniform(0, 1, 300))
        ts = ts[(ts < 0.3) | (ts > 0.4)]
        values = rng.normal(size=(len(ts), 3)).astype(np.float32)
        times = np.sort(rng.uniform(0, 1.1, 10))
        got, mask = hold_at(ts, values, times, window.max_gap_s)
        for j, t in enumerate(times):
            w, m = window.resample(ts, values, t)
            assert bool(mask[j]) == bool(m[-1]), t
            np.testing.assert_array_equal(got[j], w[-1])
            future = values.copy()
            future[ts > t] = 1e6
            np.testing.assert_array_equal(hold_at(ts, future, [t], window.max_gap_s)[0][0], got[j])


@pytest.mark.parametrize("transform", ["none", "signed_log1p"])
def test_the_target_normalizes_with_the_sensor_stats_and_back(timeline_dir, transform):
    cfg = DataConfig(
        dataset_dir=str(timeline_dir), horizon=H, sensor_transform=transform, val_fraction=0, test_fraction=0
    )
    stats = compute_stats(timeline_dir, progress=False, data_cfg=cfg, split="all")
    norm = Normalizer(stats)
    force = np.array([[120.0], [-3.5], [0.0], [1100.0]], np.float32)
    # the force channel of the full sensor normalization
    full = norm.normalize("sensor", np.concatenate([force, np.zeros_like(force)], axis=1))[:, :1]
    np.testing.assert_allclose(norm.normalize("wrench", force), full, rtol=1e-6)
    np.testing.assert_allclose(norm.unnormalize("wrench", norm.normalize("wrench", force)), force, rtol=1e-4, atol=1e-3)
