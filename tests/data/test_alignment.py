"""Timestamp alignment is causal and fresh: each sample holds the NEWEST image and state at or before its
frame time (never later, never older), and frames staler than `image_staleness_s` are dropped.

Streams encode their own true time in their values, are written with clock offsets, and read back
through EpisodeDataset, so any look-ahead, staleness or unapplied offset is visible in the values.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensorvla.config import DataConfig
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import write_dataset
from sensorvla.data.timeline import resample_window, window_grid
from sensorvla.data.types import EpisodeData, ImageStream


def timed_episode(
    cam_hz, state_hz, sensor_hz, action_hz, offsets, duration=3.0, seed=0, cam_gap=None
) -> tuple[EpisodeData, dict[str, np.ndarray]]:
    """Every stream's values are its samples' TRUE times (common clock); stored timestamps are
    true time minus the stream's clock offset (the recorder's own clock). Returns the episode and the
    true times of the camera, state and action samples. `cam_gap=(a, b)`: the camera drops out in [a, b)."""
    rng = np.random.default_rng(seed)

    def times(hz):
        t = np.arange(0.0, duration, 1.0 / hz)
        return np.sort(t + rng.uniform(0, 0.2 / hz, size=t.size))

    a_t, s_t, x_t, c_t = times(action_hz), times(state_hz), times(sensor_hz), times(cam_hz)
    if cam_gap is not None:
        c_t = c_t[(c_t < cam_gap[0]) | (c_t >= cam_gap[1])]
    frames = np.zeros((len(c_t), 4, 4, 3), np.uint8)
    frames[:, 0, 0, 0] = np.arange(len(c_t)) % 256  # frame number in a pixel
    return EpisodeData(
        name="timed",
        instruction="probe",
        action_timestamps=a_t - offsets["action"],
        actions=np.repeat(a_t[:, None], 2, 1).astype(np.float32),
        state_timestamps=s_t - offsets["state"],
        state=np.repeat(s_t[:, None], 2, 1).astype(np.float32),
        images={"cam": ImageStream(c_t - offsets["image.cam"], frames)},
        sensor_timestamps=x_t - offsets["sensor"],
        sensor=np.repeat(x_t[:, None], 3, 1).astype(np.float64),
        clock_offsets=offsets,
    ), {"cam": c_t, "state": s_t, "action": a_t}


def newest_at_or_before(times: np.ndarray, t: float) -> float:
    return float(times[times <= t + 1e-9].max())


def check_causal(root, truth, window_s=0.05, samples=8):
    cfg = DataConfig(
        dataset_dir=str(root),
        sensor_window_s=window_s,
        sensor_samples=samples,
        horizon=2,
        image_staleness_s=10.0,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    ds = EpisodeDataset(root, cfg, split="all")
    assert len(ds) > 0
    for i in range(len(ds)):
        s = ds[i]
        t = s["timestamp"]  # the action frame's true time (offset applied)
        assert s["actions"][0, 0] == pytest.approx(t, abs=1e-5)
        frame = int(s["images"][0][0, 0, 0])
        frame_time = truth["cam"][frame]
        assert frame_time <= t + 1e-9, "image from the future"
        newest = newest_at_or_before(truth["cam"], t)
        assert frame_time == newest, (
            f"stale image: frame at {frame_time:.4f}, newest at or before {t:.4f} is {newest:.4f}"
        )
        assert s["image_age_s"][0] == pytest.approx(t - frame_time, abs=1e-5)
        assert s["state"][0] <= t + 1e-5, "state from the future"
        # state values are their true times: the newest state at or before t (a 0.3 s-old one fails here)
        assert s["state"][0] == pytest.approx(newest_at_or_before(truth["state"], t), abs=1e-5), "stale state"
        measured = s["sensor"][s["sensor_mask"]]
        assert np.all(measured[:, 0] <= t + 1e-5), "sensor sample from the future"
        # interpolated values equal the grid times (values are time): the offset is applied exactly
        grid = window_grid(t, window_s, samples)[s["sensor_mask"]]
        np.testing.assert_allclose(measured[:, 0], np.minimum(grid, measured[:, 0].max()), atol=2e-3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cam_hz=st.floats(2, 30),
    state_hz=st.floats(50, 200),
    sensor_hz=st.floats(200, 1000),
    action_hz=st.floats(5, 20),
    offs=st.lists(st.floats(-0.2, 0.2), min_size=4, max_size=4),
)
def test_no_sample_sees_the_future(tmp_path_factory, cam_hz, state_hz, sensor_hz, action_hz, offs):
    offsets = dict(zip(("action", "state", "sensor", "image.cam"), offs))
    ep, truth = timed_episode(cam_hz, state_hz, sensor_hz, action_hz, offsets)
    root = write_dataset(
        [ep],
        tmp_path_factory.mktemp("prop") / "ds",
        dataset_id="prop",
        action_fps=action_hz,
        progress=False,
        image_format="npy",  # lossless: the frame number is a pixel value
    )
    check_causal(root, truth)


def test_original_rates_with_clock_offset(tmp_path):
    """5 Hz cameras, 100 Hz state, 650 Hz sensor, 10 Hz actions; the camera clock lags by 37 ms."""
    offsets = {"action": 0.0, "state": 0.002, "sensor": -0.011, "image.cam": 0.037}
    ep, truth = timed_episode(5, 100, 650, 10, offsets, duration=4.0)
    root = write_dataset([ep], tmp_path / "ds", dataset_id="orig", action_fps=10, progress=False, image_format="npy")
    check_causal(root, truth, window_s=0.1, samples=32)


@pytest.mark.parametrize("staleness", [0.3, 0.65])
def test_image_staleness_drops_exactly_the_stale_frames(tmp_path, staleness):
    """The camera (5 Hz, clock lagging 37 ms) drops out for 1.2 s: an action frame is kept iff a state and
    an image at or before it exist and that image is at most `image_staleness_s` old."""
    offsets = {"action": 0.0, "state": 0.002, "sensor": -0.011, "image.cam": 0.037}
    ep, truth = timed_episode(5, 100, 650, 10, offsets, duration=4.0, cam_gap=(1.0, 2.2))
    root = write_dataset([ep], tmp_path / "ds", dataset_id="gap", action_fps=10, progress=False, image_format="npy")
    cfg = DataConfig(dataset_dir=str(root), image_staleness_s=staleness, horizon=2, val_fraction=0.0, test_fraction=0.0)
    ds = EpisodeDataset(root, cfg, split="all")
    expected = []
    for t in truth["action"]:
        cam, state = truth["cam"][truth["cam"] <= t + 1e-9], truth["state"][truth["state"] <= t + 1e-9]
        if cam.size and state.size and t - cam.max() <= staleness:
            expected.append(t)
    kept = np.asarray([ds[i]["timestamp"] for i in range(len(ds))])
    np.testing.assert_allclose(kept, expected, atol=1e-6)
    assert ds.dropped == len(truth["action"]) - len(expected) >= 4  # the gap really drops frames
    ages = np.asarray([ds[i]["image_age_s"][0] for i in range(len(ds))])
    assert ages.max() <= staleness + 1e-6
    assert ages.max() > 0.2  # frames that are stale but within the limit are kept


def test_window_matches_analytic_signals():
    rng = np.random.default_rng(0)
    ts = np.sort(rng.uniform(0, 2, size=3000))  # irregular ~1.5 kHz
    data = np.stack([3.0 * ts - 1.0, np.sin(5 * ts)], axis=1)
    t = 1.234
    values, mask = resample_window(ts, data, t, window_s=0.2, num_samples=50, max_gap_s=0.01)
    grid = window_grid(t, 0.2, 50)
    assert grid[-1] == pytest.approx(t) and mask.all()
    np.testing.assert_allclose(values[:-1, 0], 3.0 * grid[:-1] - 1.0, atol=1e-4)  # linear: exact
    np.testing.assert_allclose(values[:-1, 1], np.sin(5 * grid[:-1]), atol=2e-4)
    # the last grid point is t: only samples <= t may be used (hold the newest one)
    last = ts[ts <= t][-1]
    assert values[-1, 0] == pytest.approx(3.0 * last - 1.0, abs=1e-5)


def test_window_masks_gaps_and_ignores_the_future():
    ts = np.concatenate([np.arange(0, 0.5, 0.001), np.arange(0.8, 1.2, 0.001)])
    data = ts[:, None].copy()
    values, mask = resample_window(ts, data, 0.9, window_s=0.6, num_samples=60, max_gap_s=0.005)
    grid = window_grid(0.9, 0.6, 60)
    in_gap = (grid > 0.505) & (grid < 0.8)
    assert not mask[in_gap].any() and mask[~in_gap].all()
    assert np.all(values[~mask] == 0)
    # changing samples after t changes nothing
    future = data.copy()
    future[ts > 0.9] = 1e6
    v2, m2 = resample_window(ts, future, 0.9, window_s=0.6, num_samples=60, max_gap_s=0.005)
    np.testing.assert_array_equal(values, v2)
    np.testing.assert_array_equal(mask, m2)
