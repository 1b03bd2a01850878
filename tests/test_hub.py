"""Hub ids wherever a path is taken (sensorvla/hub.py): a dataset and a backbone named `org/name[@revision]` train
and serve offline from a pre-filled local hub cache (built here in the hub's own layout from fixtures); a missing one
is a named error saying what to download; the resolved commit is pinned into the run's config and the VL cache key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sensorvla import hub

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lerobot"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def put_in_cache(cache: Path, repo_type: str, repo_id: str, src: Path, commit: str, refs=("main",)) -> Path:
    """Copy `src` into `cache` the way huggingface_hub lays a snapshot out: blobs + snapshot symlinks + refs."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        blob = repo / "blobs" / f"{commit[:8]}-{'-'.join(rel.parts)}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(Path("../" * (len(rel.parts) + 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative names below are never local folders by accident
    return cache


def test_local_paths_are_not_hub_ids(tmp_path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    for spec in (str(tmp_path / "org" / "name"), "./org/name", "~/x/y", "random:Qwen/Qwen2.5-VL-3B-Instruct", "a"):
        assert hub.parse(spec) is None, spec
    assert hub.parse("lerobot/pusht@v3.0") == hub.HubSpec("lerobot/pusht", "v3.0")
    assert hub.parse("Qwen/Qwen2.5-VL-3B-Instruct", "main") == hub.HubSpec("Qwen/Qwen2.5-VL-3B-Instruct", "main")
    with pytest.raises(ValueError, match="names revision 'v1'"):
        hub.parse("org/name@v1", "v2")
    got = hub.resolve(tmp_path / "org" / "name", repo_type="dataset")
    assert got.path == tmp_path / "org" / "name" and got.commit is None


def test_found_in_the_cache_by_branch_tag_and_commit(hub_cache):
    snap = put_in_cache(hub_cache, "dataset", "org/ds", FIXTURES / "image", COMMIT_A, refs=("main", "v3.0"))
    for spec in ("org/ds", "org/ds@main", "org/ds@v3.0", f"org/ds@{COMMIT_A}"):
        got = hub.resolve(spec, repo_type="dataset")
        assert got.path == snap and got.commit == COMMIT_A and got.pinned == f"org/ds@{COMMIT_A}", spec
    assert (got.path / "meta" / "info.json").exists()


def test_missing_is_a_named_error_with_the_download_command(hub_cache):
    put_in_cache(hub_cache, "dataset", "org/ds", FIXTURES / "image", COMMIT_A)
    cases = {
        ("org/other", "dataset"): "hf download org/other --repo-type dataset",
        ("org/ds@v9", "dataset"): "hf download org/ds --repo-type dataset --revision v9",
        ("org/ds", "model"): "hf download org/ds`",  # the same id as a model is another repository
    }
    for (spec, kind), command in cases.items():
        with pytest.raises(hub.HubCacheMissError) as e:
            hub.resolve(spec, repo_type=kind)
        assert command in str(e.value) and "HF_HUB_OFFLINE" in str(e.value) and str(hub_cache) in str(e.value)
    assert hub.commit_of("org/other", repo_type="dataset") is None


def _train_cfg(vl, dataset, out):
    from sensorvla.config import DataConfig, SensorVLAConfig

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = vl
    cfg.data = DataConfig(
        dataset_dir=dataset, val_fraction=0.0, test_fraction=0.0, horizon=4, sensor_window_s=1.0, sensor_samples=8
    )
    cfg.train.output_dir = str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.epochs, cfg.train.max_steps = 4, 1, 1, 2
    cfg.train.log_every_steps, cfg.train.tensorboard, cfg.train.use_cache = 1, False, "never"
    cfg.train.val_every_epochs = 1000
    return cfg


def test_a_hub_dataset_and_backbone_train_and_serve_offline_pinned(hub_cache, tmp_path, tiny_vl_dir):
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.training.loop import train

    data_snap = put_in_cache(hub_cache, "dataset", "org/ds", FIXTURES / "image", COMMIT_A, refs=("main", "v3.0"))
    put_in_cache(hub_cache, "model", "org/tiny-vl", Path(tiny_vl_dir), COMMIT_B)
    cfg = _train_cfg("org/tiny-vl@main", "org/ds@v3.0", tmp_path / "run")
    train(cfg, progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "pretrained_model"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["data"]["dataset_hub"] == f"org/ds@{COMMIT_A}"
    assert Path(saved["data"]["dataset_dir"]) == data_snap
    assert saved["model"]["backbone"]["vl_model"] == "org/tiny-vl"
    assert saved["model"]["backbone"]["revision"] == COMMIT_B
    # served offline from the cache: the pinned commit, no local path in the config
    runner = PolicyRunner.from_pretrained(ckpt)
    obs = {"images": [np.zeros((32, 32, 3), np.uint8)], "state": np.zeros(runner.cfg.model.state_dim, np.float32)}
    obs.update(instruction="push", timestamp=0.0, sensor=np.zeros((0, 3), np.float32), sensor_timestamps=np.zeros(0))
    assert np.isfinite(runner.infer(obs)["actions"]).all()
    # exported for another machine with the backbone named by hub id: pinned to the cached commit
    from sensorvla.cli.app import main

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--vl-model", "org/tiny-vl"]) == 0
    backbone = json.loads((out / "config.json").read_text())["model"]["backbone"]
    assert (backbone["vl_model"], backbone["revision"]) == ("org/tiny-vl", COMMIT_B)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--vl-model", "org/gone"]) == 1


def test_the_resolved_commit_keys_the_vl_cache(hub_cache, tmp_path):
    from sensorvla.training.data_setup import pin_hub_ids
    from sensorvla.training.feature_cache import fingerprint, fingerprint_key

    src = tmp_path / "model_src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    put_in_cache(hub_cache, "model", "org/vl", src, COMMIT_A)
    ids = np.arange(4)
    cfg = _train_cfg("org/vl", "", tmp_path / "run")
    fp_a = fingerprint(cfg, ids, "d")
    assert fp_a["vl_commit"] == COMMIT_A and pin_hub_ids(cfg).model.backbone.revision == COMMIT_A
    # main moves to another commit: same id, same revision name, another key
    put_in_cache(hub_cache, "model", "org/vl", src, COMMIT_B)
    fp_b = fingerprint(cfg, ids, "d")
    assert fp_b["vl_commit"] == COMMIT_B and fingerprint_key(fp_a) != fingerprint_key(fp_b)
    # a local folder has no commit
    assert fingerprint(_train_cfg(str(src), "", tmp_path / "run"), ids, "d")["vl_commit"] is None


def test_a_missing_hub_backbone_fails_with_the_download_command(hub_cache):
    from sensorvla.models.backbone import BackboneLoadError, load_vl_config

    with pytest.raises(BackboneLoadError, match="hf download org/absent"):
        load_vl_config("org/absent@v1")
