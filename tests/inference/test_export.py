"""`sensorvla export`: one folder that `sensorvla serve` (PolicyRunner) and LeRobot (the lerobot_policy_sensorvla
plugin, tests/plugins) both load; every file of it is covered by the manifest, so a changed one is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from runner_helpers import obs_from_dataset

from sensorvla.config import DataConfig
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.inference.runner import PolicyRunner
from sensorvla.models.folder import CheckpointMismatchError, export_folder, read_config


def run(args) -> int:
    from sensorvla.cli.app import main

    return main(args)


def test_the_exported_folder_serves_the_same_actions(checkpoint, synth_dataset_dir, tmp_path):
    out = tmp_path / "export"
    assert run(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    data = json.loads((out / "config.json").read_text())
    cfg = read_config(checkpoint)
    assert data["type"] == "sensorvla" and data["fps"] == 10.0
    assert set(data["input_features"]) == {f"observation.images.{v}" for v in cfg.data.views} | {"observation.state"}
    assert data["input_features"]["observation.images.front"]["type"] == "VISUAL"
    assert data["output_features"] == {"action": {"type": "ACTION", "shape": [cfg.model.head.action_dim]}}
    assert read_config(out) == cfg  # LeRobot's keys are set aside, ours are unchanged
    steps = json.loads((out / "policy_preprocessor.json").read_text())["steps"]
    assert [s["registry_name"] for s in steps] == ["rename_observations_processor", "device_processor"]
    manifest = json.loads((out / "manifest.json").read_text())["sha256"]
    assert set(manifest) == {p.name for p in out.iterdir()} - {"manifest.json"}
    ds = EpisodeDataset(synth_dataset_dir, DataConfig(dataset_dir=str(synth_dataset_dir)), split="all")
    obs = obs_from_dataset(ds, 5)
    a, b = PolicyRunner.from_pretrained(checkpoint), PolicyRunner.from_pretrained(out)
    np.testing.assert_array_equal(a.infer(obs)["actions"], b.infer(obs)["actions"])


@pytest.mark.parametrize("name", ["config.json", "norm_stats.json", "policy_preprocessor.json"])
def test_a_changed_file_of_the_export_is_refused(checkpoint, tmp_path, name):
    out = export_folder(checkpoint, tmp_path / "export")
    path = out / name
    path.write_text(path.read_text() + " ")  # one byte more: still valid JSON, another sha256
    with pytest.raises(CheckpointMismatchError, match=name):
        PolicyRunner.from_pretrained(out)


def test_image_shapes_without_the_dataset(checkpoint, tmp_path):
    src = tmp_path / "moved"
    shutil.copytree(checkpoint, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["data"]["dataset_dir"] = str(tmp_path / "elsewhere")
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "manifest.json").unlink()  # rewritten below: the config moved on purpose
    with pytest.raises(ValueError, match="--image-shape VIEW=HxW"):
        export_folder(src, tmp_path / "a")
    assert run(["export", "--checkpoint", str(src), "--out", str(tmp_path / "b"), "--image-shape", "front=48x64"]) == 2
    shapes = ["front=48x64", "top=480x640"]
    assert run(["export", "--checkpoint", str(src), "--out", str(tmp_path / "b"), "--image-shape", *shapes]) == 0
    features = json.loads((tmp_path / "b" / "config.json").read_text())["input_features"]
    assert features["observation.images.top"]["shape"] == [3, 480, 640]
    assert run(["export", "--checkpoint", str(src), "--out", str(tmp_path / "c"), "--image-shape", "top=480"]) == 2
