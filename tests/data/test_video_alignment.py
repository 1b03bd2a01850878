"""Cameras stored as video (held on the action grid for LeRobot) keep the multi-rate alignment exact:
the newest capture at or before t, its true age, the staleness rule, clock offsets."""

from __future__ import annotations

import numpy as np
import pytest

from sensorvla.config import DataConfig
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import load_meta, write_dataset
from sensorvla.data.source import LeRobotSource
from sensorvla.data.types import EpisodeData, ImageStream


def flat_frame(k: int) -> np.ndarray:
    """A flat colour encoding the capture number k in two channels (survives H.264 and yuv420p)."""
    img = np.full((16, 16, 3), 128, np.uint8)
    img[..., 0], img[..., 1] = 20 + 10 * (k % 20), 20 + 10 * (k // 20)
    return img


def episode(cam_hz=5.0, cam_offset=0.037, gap=None) -> tuple[EpisodeData, np.ndarray]:
    a_t = np.arange(40) * 0.1  # 10 Hz actions, 4 s
    cam_true = np.arange(0.02, 4.0, 1 / cam_hz)  # true (common-clock) capture times
    if gap is not None:
        cam_true = cam_true[(cam_true < gap[0]) | (cam_true > gap[1])]
    frames = np.stack([flat_frame(k) for k in range(len(cam_true))])
    ep = EpisodeData(
        name="cam",
        instruction="look",
        action_timestamps=a_t,
        actions=np.repeat(a_t[:, None], 2, 1).astype(np.float32),
        state_timestamps=np.arange(0, 4.0, 0.01),
        state=np.zeros((400, 3), np.float32),
        images={"cam": ImageStream(cam_true - cam_offset, frames)},  # stored on the camera's own clock
        clock_offsets={"image.cam": cam_offset},
    )
    return ep, cam_true


def decoded_number(img: np.ndarray) -> int:
    r, g = (int(round((float(img[..., c].mean()) - 20) / 10)) for c in (0, 1))
    return r + 20 * g


@pytest.mark.parametrize("cam_hz", [5.0, 10.0, 25.0])
def test_video_frames_are_the_newest_capture_at_or_before_t(tmp_path, cam_hz):
    ep, cam_true = episode(cam_hz)
    root = write_dataset([ep], tmp_path / "ds", dataset_id="v", action_fps=10, progress=False)
    assert load_meta(root).cameras["cam"].storage == "video"
    cfg = DataConfig(dataset_dir=str(root), val_fraction=0.0, test_fraction=0.0, horizon=2, image_staleness_s=0.5)
    ds = EpisodeDataset(root, cfg, split="all")
    assert ds.dropped == 1  # t = 0.0 has no capture yet
    for i in range(len(ds)):
        s = ds[i]
        t = s["timestamp"]
        k = decoded_number(s["images"][0])
        newest = int(np.searchsorted(cam_true, t, side="right")) - 1
        assert k == newest, (t, k, newest)  # never a future frame, never a stale one
        assert s["image_age_s"][0] == pytest.approx(t - cam_true[k], abs=1e-6)
    # LeRobot's view of the same file: video frame of row i = the newest capture at or before row i
    frames = LeRobotSource.open(root).load(0).images["cam"].frames
    for i in range(1, len(frames)):
        assert decoded_number(frames[i]) == int(np.searchsorted(cam_true, i * 0.1, side="right")) - 1


def test_video_staleness_rule_drops_frames_across_a_camera_gap(tmp_path):
    ep, cam_true = episode(5.0, gap=(1.0, 2.2))  # the camera stalls for 1.2 s
    root = write_dataset([ep], tmp_path / "ds", dataset_id="v", action_fps=10, progress=False)
    cfg = DataConfig(dataset_dir=str(root), val_fraction=0.0, test_fraction=0.0, horizon=2, image_staleness_s=0.5)
    ds = EpisodeDataset(root, cfg, split="all")
    times = np.array([ds[i]["timestamp"] for i in range(len(ds))])
    last_before_gap = cam_true[cam_true < 1.0][-1]
    dropped = np.round(np.arange(40) * 0.1, 6)
    dropped = dropped[(dropped - last_before_gap > 0.5) & (dropped < cam_true[cam_true > 2.2][0])]
    assert len(dropped) > 0 and not np.isin(np.round(times, 6), dropped).any()
    assert all(ds[i]["image_age_s"][0] <= 0.5 + 1e-9 for i in range(len(ds)))


def test_rows_holding_the_same_capture_share_a_vl_key(tmp_path):
    """The stage-1 cache encodes a camera frame set once: rows that hold the same captures share vl_key."""
    ep, cam_true = episode(5.0)
    root = write_dataset([ep], tmp_path / "ds", dataset_id="v", action_fps=10, progress=False)
    cfg = DataConfig(dataset_dir=str(root), val_fraction=0.0, test_fraction=0.0, horizon=2)
    ds = EpisodeDataset(root, cfg, split="all")
    keys = [ds.vl_key(i) for i in range(len(ds))]
    captures = [decoded_number(ds[i]["images"][0]) for i in range(len(ds))]
    for a in range(len(ds)):
        for b in range(len(ds)):
            assert (keys[a] == keys[b]) == (captures[a] == captures[b])
    assert len(set(keys)) == len(set(captures)) < len(ds)  # 5 Hz frames under 10 Hz rows: about half
