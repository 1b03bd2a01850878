"""LeRobot per-frame float features of any shape: a scalar / (1,) one (a gripper width) joins the sensor tensor, a
2-D one (a tactile array) is named with the stream that reads it and reads as that stream, and choosing a subset
with --data.sensor-keys sizes the model from that subset."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_lerobot import FIXTURES, _tiny_train_cfg, fixture_cfg

from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import load_meta


def gripper(index: np.ndarray) -> np.ndarray:
    return (0.5 + 0.01 * index).astype(np.float32)


def tactile(index: np.ndarray) -> np.ndarray:
    return (np.arange(12, dtype=np.float32)[None] * 0.1 + index[:, None]).reshape(-1, 3, 4).astype(np.float32)


@pytest.fixture
def with_features(tmp_path) -> Path:
    """video_h264 (per-frame observation.force (6,)) plus observation.gripper stored as LeRobot stores a (1,)
    feature (a plain float column) and observation.tactile (3, 4) (rows of rows)."""
    root = Path(shutil.copytree(FIXTURES / "video_h264", tmp_path / "ds"))
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    index = table.column("index").to_numpy()
    table = table.append_column("observation.gripper", pa.array(gripper(index)))
    rows = pa.array(tactile(index).tolist(), type=pa.list_(pa.list_(pa.float32(), 4), 3))
    table = table.append_column("observation.tactile", rows)
    pq.write_table(table, path)
    info_path = root / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.gripper"] = {"dtype": "float32", "shape": [1], "names": None}
    info["features"]["observation.tactile"] = {"dtype": "float32", "shape": [3, 4], "names": None}
    info_path.write_text(json.dumps(info))
    return root


def test_a_1_element_feature_joins_the_sensor_and_a_2d_one_is_named(with_features, caplog):
    with caplog.at_level(logging.WARNING):
        meta = load_meta(with_features)
    assert meta.sensor_keys == ["observation.force", "observation.gripper"] and meta.sensor_channels == 7
    ds = EpisodeDataset(with_features, fixture_cfg(with_features), split="all")  # was a raw AxisError
    s = ds[5]
    assert s["sensor"].shape == (8, 7) and s["sensor_mask"][-1]
    assert s["sensor"][-1, 6] == pytest.approx(gripper(np.array([5]))[0])  # frame 5's gripper width at t
    assert "--data.streams 'tactile=taxel2d,source=observation.tactile'" in caplog.text  # was silently ignored


def test_a_2d_feature_reads_as_a_declared_stream(with_features):
    cfg = fixture_cfg(with_features, streams=("tactile=taxel2d,source=observation.tactile,samples=4",))
    ds = EpisodeDataset(with_features, cfg, split="all")
    (spec,) = ds.streams
    assert spec.shape == (3, 4) and spec.rate_hz == 15.0
    s = ds[5]
    assert s["sensor.tactile"].shape == (4, 3, 4) and s["sensor_mask.tactile"][-1]
    np.testing.assert_allclose(s["sensor.tactile"][-1], tactile(np.array([5]))[0], rtol=1e-6)


def test_a_missing_source_names_the_dataset_streams(with_features):
    from sensorvla.data.types import DataError

    cfg = fixture_cfg(with_features, streams=("tactile=taxel2d,source=observation.skin",))
    with pytest.raises(DataError, match=r"observation.skin.*observation.tactile"):
        EpisodeDataset(with_features, cfg, split="all")


def test_a_sensor_keys_subset_sizes_the_model(with_features, tmp_path, tiny_vl_dir):
    """Before, the model was sized from every candidate feature (7 channels) and the first batch (6) crashed."""
    from sensorvla.training.loop import train

    cfg = _tiny_train_cfg(tiny_vl_dir, with_features, tmp_path / "run")
    cfg.data.sensor_keys = ("observation.force",)
    cfg.train.max_steps = 2
    result = train(cfg, progress=False)
    assert len(result["train_loss"]) == 2 and result["config"]["model"]["sensor"]["channels"] == 6
