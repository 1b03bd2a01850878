"""Rollout videos (`eval/rollout_video.py`): a decodable H.264 mp4 of one frame per step, the views, the sensor trace
with a moving cursor; which episodes of a rollout get one (`VideoChooser`); the recorder's sensor history."""

from __future__ import annotations

import av
import numpy as np
import pytest

from sensorvla.eval.rollout import VideoChooser
from sensorvla.eval.rollout_video import (
    BAR,
    PANEL_WIDTH,
    EpisodeRecorder,
    SensorPanel,
    rollout_video_size,
    write_rollout_video,
)

T = 12


def episode(channels: int = 5):
    """Two 32 px views (a moving bright square on grey), a sensor history of `channels` channels, 7-D actions."""
    rng = np.random.default_rng(0)
    front, top = [], []
    for k in range(T):
        img = np.full((32, 32, 3), 90, np.uint8)
        img[8:16, 2 * k : 2 * k + 8] = 250
        front.append(img)
        top.append(np.full((32, 32, 3), 160, np.uint8))
    times = np.arange(T) * 0.1
    s_t = np.linspace(-0.2, times[-1], 200)
    s_v = np.stack([np.sin(s_t * (c + 1) * 3) for c in range(channels)], 1) + rng.normal(0, 0.05, (200, channels))
    return {"front": front, "top": top}, times, s_t, s_v, rng.normal(size=(T - 1, 7))


def decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def red_columns(frame: np.ndarray, x0: int) -> np.ndarray:
    """Columns right of `x0` (the plot panel) holding the red cursor."""
    panel = frame[BAR:-BAR, x0:].astype(int)
    red = (panel[..., 0] > 180) & (panel[..., 1] < 90) & (panel[..., 2] < 90)
    return np.flatnonzero(red.sum(0) > 20) + x0


def test_video_has_a_frame_per_step_the_views_and_a_trace_with_a_moving_cursor(tmp_path):
    views, times, s_t, s_v, actions = episode()
    path = write_rollout_video(
        tmp_path / "ep.mp4", views, times, s_t, s_v, actions, success=True, title="episode 0", fps=10
    )
    frames = decode(path)
    h, w = rollout_video_size(views)
    s = 9  # 32 px views scaled up towards VIEW_HEIGHT = 300 px
    assert (h, w) == (2 * BAR + 32 * s, 2 * 32 * s + PANEL_WIDTH)
    assert len(frames) == T and frames[0].shape == (h, w, 3)
    # the views, upscaled, side by side (H.264 is lossy: close, not equal)
    view_w = 32 * s
    got_front = frames[5][BAR : BAR + 32 * s, :view_w].astype(int)
    want_front = views["front"][5].repeat(s, 0).repeat(s, 1).astype(int)
    assert np.abs(got_front - want_front).mean() < 6
    # the trace panel is drawn (not blank) and its cursor moves right with time
    panel = frames[0][BAR:-BAR, 2 * view_w :]
    assert panel.std() > 20
    cursors = [red_columns(f, 2 * view_w) for f in (frames[0], frames[6], frames[-1])]
    assert all(len(c) for c in cursors), "no cursor in the trace panel"
    assert cursors[0].mean() < cursors[1].mean() < cursors[2].mean()
    # the last frame's title bar shows the outcome in green
    assert frames[-1][BAR // 2, w // 2, 1] > 120 > frames[-1][BAR // 2, w // 2, 0]


def test_many_channels_become_a_heatmap_and_bad_input_is_refused(tmp_path):
    views, times, s_t, s_v, actions = episode(channels=33)
    assert SensorPanel().resolve(33) == ([], list(range(33)))
    assert SensorPanel(lines=[0]).resolve(33) == ([0], list(range(1, 33)))
    assert SensorPanel().resolve(3) == ([0, 1, 2], [])
    path = write_rollout_video(tmp_path / "h.mp4", views, times, s_t, s_v, actions, success=False,
                               sensor_panel=SensorPanel(lines=[0], names=["force"]))  # fmt: skip
    assert len(decode(path)) == T
    without = write_rollout_video(tmp_path / "n.mp4", views, times, None, None, None, success=None)
    assert len(decode(without)) == T
    with pytest.raises(ValueError, match="one frame per time"):
        write_rollout_video(tmp_path / "bad.mp4", {"a": views["front"][:-1]}, times)


def test_recorder_keeps_each_sensor_sample_once_and_writes_what_it_saw(tmp_path):
    rec = EpisodeRecorder(view_names=("front", "top"))
    ts = np.arange(0, 50) * 0.01
    for k in range(4):  # overlapping 0.25 s windows, as the env sends them
        window = (ts > 0.1 * k - 0.25) & (ts <= 0.1 * k)
        obs = {
            "images": np.zeros((2, 16, 16, 3), np.uint8) + k,
            "timestamp": np.array(0.1 * k),
            "sensor": np.stack([ts[window], -ts[window]], 1).astype(np.float32),
            "sensor_timestamps": ts[window],
        }
        rec.observe(obs)
        if k < 3:
            rec.act(np.full(7, k, np.float32))
    s_t, s_v = rec.sensor()
    np.testing.assert_allclose(s_t, ts[ts <= 0.3 + 1e-9])
    np.testing.assert_allclose(s_v[:, 1], -s_t, atol=1e-6)
    assert list(rec.views) == ["front", "top"] and len(rec.views["top"]) == 4 and len(rec.actions) == 3
    assert len(decode(rec.write(tmp_path / "r.mp4", success=True))) == 4


@pytest.mark.parametrize(
    ("choice", "outcomes", "want"),
    [
        ("outcomes", [True, True, False, False, True], [0, 2]),
        ("outcomes", [True, True, True], [0]),
        ("failure", [True, False, False], [1]),
        ("failure", [True, True], [0]),  # no failure: the first episode
        ("success", [False, True], [1]),
        ("first", [False, True], [0]),
        ("all", [False, True, True], [0, 1, 2]),
        ("none", [False, True], []),
    ],
)
def test_video_chooser_picks_the_episodes_asked_for(choice, outcomes, want):
    chooser = VideoChooser(choice)
    for ep, ok in enumerate(outcomes):
        if chooser.recording:
            chooser.offer(ep, ok, object())
    assert [ep for ep, _, _ in chooser.chosen()] == want
