"""Datasets written by the real `lerobot` library (tests/fixtures/lerobot) read and train directly; a
sensorvla-written dataset opens in the real LeRobot (marked `interop`); bad LeRobot input is refused."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sensorvla.config import DataConfig
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import load_meta, read_frames
from sensorvla.data.timeline import window_grid
from sensorvla.data.types import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot"
_spec = importlib.util.spec_from_file_location("lerobot_patterns", FIXTURES / "patterns.py")
patterns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(patterns)
NAMES = list(patterns.SPECS)


def fixture_cfg(root, **kw) -> DataConfig:
    base = dict(
        dataset_dir=str(root),
        val_fraction=0.0,
        test_fraction=0.0,
        horizon=4,
        sensor_window_s=1.0,  # a 10-15 Hz per-frame force: a 1 s window of 8 points
        sensor_samples=8,
    )
    return DataConfig(**{**base, **kw})


@pytest.fixture
def copy_of(tmp_path):
    def make(name: str) -> Path:
        return Path(shutil.copytree(FIXTURES / name, tmp_path / name))

    return make


@pytest.mark.parametrize("name", NAMES)
def test_meta_of_a_lerobot_dataset(name):
    spec = patterns.SPECS[name]
    meta = load_meta(FIXTURES / name)
    assert meta.views == sorted(k.removeprefix("observation.images.") for k in spec["cameras"])
    assert meta.action_fps == spec["fps"] and meta.action_dim == patterns.ACTION_DIM
    assert meta.state_dim == patterns.STATE_DIM and len(meta.episodes) == len(spec["lengths"])
    assert meta.tasks == list(dict.fromkeys(spec["tasks"]))
    assert meta.sensor_keys == (["observation.force"] if spec["force"] else [])
    assert meta.sensor_channels == (patterns.FORCE_DIM if spec["force"] else 0)
    assert {c.storage for c in meta.cameras.values()} == {d for d, _, _ in spec["cameras"].values()}


@pytest.mark.parametrize("name", NAMES)
def test_every_sample_of_a_lerobot_dataset(name):
    spec = patterns.SPECS[name]
    root = FIXTURES / name
    ds = EpisodeDataset(root, fixture_cfg(root), split="all")
    assert len(ds) == sum(spec["lengths"]) and ds.dropped == 0
    keys = {k.removeprefix("observation.images."): k for k in spec["cameras"]}
    for idx in range(len(ds)):
        s = ds[idx]
        e, i = s["episode_index"], s["frame_index"]
        assert s["instruction"] == spec["tasks"][e]
        np.testing.assert_array_equal(s["state"], patterns.state(e, i))
        np.testing.assert_array_equal(s["actions"][0], patterns.action(e, i))
        assert s["timestamp"] == pytest.approx(i / spec["fps"], abs=1e-6)
        assert np.all(s["image_age_s"] == 0)
        for view, img in zip(ds.views, s["images"]):
            dtype, h, w = spec["cameras"][keys[view]]
            err = np.abs(img.astype(int) - patterns.frame(keys[view], e, i, h, w)).mean()
            if dtype == "image":
                assert err == 0  # PNG in the parquet: lossless
            else:  # decoded by timestamp: the right frame, not a neighbour
                other = np.abs(img.astype(int) - patterns.frame(keys[view], e, i + 1, h, w)).mean()
                assert err < 6 and err < 0.5 * other, (err, other)
        if spec["force"]:
            measured = s["sensor"][s["sensor_mask"]]
            # the grid points of (t - 1 s, t] at or after the episode's first sample are measured, no others
            assert s["has_sensor"] and len(measured) == np.sum(window_grid(s["timestamp"], 1.0, 8) >= -1e-6)
            np.testing.assert_array_equal(measured[-1], patterns.force(e, i))  # the window ends at t
        else:
            assert not s["has_sensor"]


def test_views_selected_by_name_or_key():
    root = FIXTURES / "video_av1"
    for wanted in (("wrist",), ("observation.images.wrist",)):
        ds = EpisodeDataset(root, fixture_cfg(root, views=wanted), split="all")
        assert ds.views == ["wrist"] and ds[0]["images"][0].shape == (32, 32, 3)
    with pytest.raises(DataError, match=r"--data.views \['side'\].*observation.images.front"):
        EpisodeDataset(root, fixture_cfg(root, views=("side",)), split="all")


def _tiny_train_cfg(vl_dir, root, out):
    from sensorvla.config import SensorVLAConfig

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.data = fixture_cfg(root)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps = 8, 1
    cfg.train.epochs, cfg.train.max_steps = 40, 20
    cfg.train.lr = cfg.train.sensor_lr = 2e-3
    cfg.train.log_every_steps, cfg.train.tensorboard, cfg.train.use_cache = 1, False, "never"
    cfg.train.val_every_epochs = 1000
    return cfg


@pytest.mark.parametrize("name", NAMES)
def test_trains_on_a_lerobot_dataset(name, copy_of, tmp_path, tiny_vl_dir):
    import torch

    from sensorvla.training.loop import train

    torch.manual_seed(0)
    root = copy_of(name)
    result = train(_tiny_train_cfg(tiny_vl_dir, root, tmp_path / "run"), progress=False)
    losses = result["train_loss"]
    assert len(losses) == 20 and np.all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    cfg_saved = json.loads(next((tmp_path / "run" / "checkpoints").rglob("config.json")).read_text())
    assert cfg_saved["model"]["sensor"]["enabled"] == patterns.SPECS[name]["force"]


# --- bad LeRobot input ----------------------------------------------------------------------------------
def _expect(root, *needles, **cfg_kw):
    with pytest.raises(DataError) as ei:
        EpisodeDataset(root, fixture_cfg(root, **cfg_kw), split="all")
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    assert "Fix:" in msg, msg
    return msg


def _video(root, key="observation.images.front"):
    return root / "videos" / key / "chunk-000" / "file-000.mp4"


def test_missing_video(copy_of):
    root = copy_of("video_av1")
    _video(root).unlink()
    _expect(root, str(_video(root)), "missing")


def test_undecodable_video(copy_of):
    root = copy_of("video_av1")
    _video(root).write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    _expect(root, str(_video(root)), "cannot open the video")


def test_video_shorter_than_its_episode(copy_of):
    from sensorvla.data.video import VideoEncoder

    root = copy_of("video_h264")
    path = _video(root, "observation.images.top")
    enc = VideoEncoder(path, 15, 32, 48)
    for i in range(15):  # the dataset needs 23 frames
        enc.add(patterns.frame("observation.images.top", 0, i, 32, 48))
    enc.close()
    _expect(root, str(path), "shorter than its episode")


def test_timestamps_off_the_frame_grid(copy_of):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = copy_of("video_av1")
    data = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    ts = table.column("timestamp").to_numpy().copy()
    ts[5] += 0.03  # a capture-time timestamp 30 ms off its frame
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(ts, pa.float32()))
    pq.write_table(table, data)
    _expect(root, "row 5", "off the frame grid", "frame_index / fps")
    ds = EpisodeDataset(root, fixture_cfg(root, timestamp_tolerance_s=0.05), split="all")  # the named fix
    assert len(ds) == 34


@pytest.mark.parametrize(("version", "needle"), [("v2.1", "convert_dataset_v21_to_v30"), ("v4.0", "unsupported")])
def test_unsupported_version(copy_of, version, needle):
    root = copy_of("image")
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["codebase_version"] = version
    info_path.write_text(json.dumps(info))
    msg = _expect(root, needle, str(info_path))
    if version == "v2.1":
        assert f"--root={root}" in msg


def test_missing_action_feature_is_a_clear_error(copy_of):
    root = copy_of("image")
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["actions"] = info["features"].pop("action")
    info_path.write_text(json.dumps(info))
    _expect(root, "no 'action' feature", "'actions'")


def test_unknown_sensor_key(copy_of):
    _expect(FIXTURES / "video_av1", "--data.sensor-keys ['observation.torque']", sensor_keys=("observation.torque",))


def test_written_rows_round_trip_through_the_frame_table():
    table = read_frames(FIXTURES / "image")
    assert table.num_rows == sum(patterns.SPECS["image"]["lengths"])


# --- the real LeRobot opens what we write -------------------------------------------------------------------
def lerobot_python() -> str | None:
    """SENSORVLA_LEROBOT_PYTHON, else /work/lerobot-venv/bin/python when it exists (None: skip)."""
    exe = os.environ.get("SENSORVLA_LEROBOT_PYTHON")
    if exe:
        return exe
    default = Path("/work/lerobot-venv/bin/python")
    return str(default) if default.exists() else None


LEROBOT_CHECK = r"""
import json, sys
import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset
root, horizon = sys.argv[1], int(sys.argv[2])
ds = LeRobotDataset(repo_id="local/sensorvla", root=root, video_backend="pyav")
fps = ds.fps
chunks = LeRobotDataset(
    repo_id="local/sensorvla", root=root, video_backend="pyav",
    delta_timestamps={"action": [k / fps for k in range(horizon)]},
)
out = {"fps": fps, "type_fps": type(ds.meta.info["fps"]).__name__, "cameras": ds.meta.camera_keys, "n": len(ds)}
frames, tasks, actions, pads = [], [], [], []
for i in range(len(ds)):
    item = ds[i]
    frames.append({k: list(item[k].shape) + [float(item[k].float().mean())] for k in ds.meta.camera_keys})
    tasks.append(item["task"])
    c = chunks[i]
    actions.append(c["action"].numpy().tolist())
    pads.append(c["action_is_pad"].numpy().tolist())
out.update(frames=frames, tasks=tasks, actions=actions, pads=pads, stats_keys=sorted(ds.meta.stats))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.interop
def test_lerobot_opens_a_sensorvla_dataset(tmp_path):
    """The real lerobot 0.4.4 (a separate venv) decodes every camera, returns the task string and loads
    delta_timestamps action chunks of `data synth` output. Skipped when that environment is absent."""
    exe = lerobot_python()
    if exe is None:
        pytest.skip(
            "no LeRobot environment (set SENSORVLA_LEROBOT_PYTHON, see tests/fixtures/lerobot/make_fixtures.py)"
        )
    from sensorvla.world.synth import generate_dataset

    root = generate_dataset(tmp_path / "synth", num_episodes=3, seed=4, progress=False)
    horizon = 4
    proc = subprocess.run(
        [exe, "-c", LEROBOT_CHECK, str(root), str(horizon)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(tmp_path / "lerobot_home")},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[len("RESULT ") :])
    meta = load_meta(root)
    ds = EpisodeDataset(root, DataConfig(dataset_dir=str(root), horizon=horizon), split="all", load_images=False)
    assert out["fps"] == 10 and out["type_fps"] == "int"
    assert sorted(out["cameras"]) == ["observation.images.front", "observation.images.top"]
    assert out["n"] == sum(r["length"] for r in meta.episodes)
    h, w, _ = meta.image_shape
    for f in out["frames"]:  # every camera of every frame decodes, (3, h, w) in [0, 1], not blank
        for shape_mean in f.values():
            assert shape_mean[:3] == [3, h, w] and 0.3 < shape_mean[3] < 1.0
    table = read_frames(root).to_pydict()
    assert out["tasks"] == [meta.tasks[k] for k in table["task_index"]]
    assert set(out["tasks"]) == {r["instruction"] for r in meta.episodes}
    acts = np.asarray(table["action"], np.float32)
    ep = np.asarray(table["episode_index"])
    for i, (chunk, pad) in enumerate(zip(out["actions"], out["pads"])):
        same = np.nonzero(ep == ep[i])[0]
        want = [min(i + k, same[-1]) for k in range(horizon)]
        np.testing.assert_allclose(np.asarray(chunk), acts[want], rtol=0, atol=0)
        assert pad == [i + k > same[-1] for k in range(horizon)]
    assert {"action", "observation.state", "observation.images.front"} <= set(out["stats_keys"])
    # our own reader sees the same action chunks (sensorvla pads with zeros where LeRobot repeats the last)
    for k in (0, len(ds) // 2):
        s = ds[k]
        i = s["sample_id"]
        np.testing.assert_array_equal(s["actions"][s["action_mask"]], acts[i : i + int(s["action_mask"].sum())])
        np.testing.assert_array_equal(s["actions"][s["action_mask"]], np.asarray(out["actions"][i])[s["action_mask"]])


@pytest.mark.interop
def test_lerobot_ignores_an_attached_sidecar(tmp_path):
    """A LeRobot-written dataset with a sensor attached by `add-sensor` still opens in the real LeRobot."""
    exe = lerobot_python()
    if exe is None:
        pytest.skip(
            "no LeRobot environment (set SENSORVLA_LEROBOT_PYTHON, see tests/fixtures/lerobot/make_fixtures.py)"
        )
    from sensorvla.data.attach import add_sensor

    root = Path(shutil.copytree(FIXTURES / "video_h264", tmp_path / "ds"))
    ts = np.arange(0, 0.7, 1 / 500.0)
    np.savez(tmp_path / "s.npz", timestamps=ts, values=np.stack([ts, -ts], 1))
    add_sensor(root, tmp_path / "s.npz", episode=0)
    proc = subprocess.run(
        [exe, "-c", LEROBOT_CHECK, str(root), "3"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(tmp_path / "lerobot_home")},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[len("RESULT ") :])
    spec = patterns.SPECS["video_h264"]
    assert out["n"] == sum(spec["lengths"]) and out["cameras"] == ["observation.images.top"]
    assert out["tasks"] == [t for t, n in zip(spec["tasks"], spec["lengths"]) for _ in range(n)]
    assert load_meta(root).sensor_keys == ["sensor"]
