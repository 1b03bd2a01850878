"""PolicyRunner: identical model inputs to the training path, fast-slow VL reuse, and serving a real runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runner_helpers import later_samples, obs_from_dataset

from sensorvla.config import SensorVLAConfig, resolve_from_meta
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import load_meta
from sensorvla.data.normalize import compute_stats
from sensorvla.inference.runner import PolicyRunner
from sensorvla.models.backbone import pad_token_id
from sensorvla.models.folder import save_pretrained
from sensorvla.models.policy import build_policy
from sensorvla.models.processor import collate


def test_runner_inputs_equal_training_inputs(checkpoint, synth_dataset_dir):
    runner = PolicyRunner.from_pretrained(checkpoint)
    cfg = runner.cfg.data
    ds = EpisodeDataset(synth_dataset_dir, cfg, split="all")
    for idx in (0, 7, len(ds) // 2, len(ds) - 1):
        train_batch = collate([runner.transform(ds[idx])], pad_token_id(runner.processor))
        run_batch = runner.prepare(obs_from_dataset(ds, idx))
        targets = {"actions", "action_mask", "wrench_target", "wrench_target_mask"}  # training-only keys
        assert set(train_batch) - targets == set(run_batch)
        for k in run_batch:
            if k == "sample_id":
                continue
            assert torch.equal(train_batch[k], run_batch[k]), k


def test_infer_outputs_physical_units_and_timing(checkpoint, synth_dataset_dir):
    runner = PolicyRunner.from_pretrained(checkpoint)
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
    out = runner.infer(obs_from_dataset(ds, 3))
    assert out["actions"].shape == (runner.cfg.model.head.horizon, runner.cfg.model.head.action_dim)
    expected = runner.normalizer.unnormalize("actions", out["actions_normalized"])
    np.testing.assert_allclose(out["actions"], expected, rtol=1e-6)
    assert set(out["timing"]) >= {"preprocess_ms", "vl_ms", "sensor_ms", "head_ms", "postprocess_ms"}
    again = runner.infer(obs_from_dataset(ds, 3))  # seeded sampling: deterministic
    np.testing.assert_array_equal(out["actions"], again["actions"])


def test_fast_slow_reuses_vl_and_reacts_to_sensor(checkpoint, synth_dataset_dir):
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=4, max_vl_age_s=60.0)
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
    idx = next(i for i in range(len(ds)) if ds[i]["has_sensor"])
    obs = obs_from_dataset(ds, idx)
    for _ in range(8):
        runner.infer(obs)  # the same window resent: de-duplicated by the history
    assert runner.vl_calls == 2  # calls 0 and 4 refresh; the other six reuse the features
    base = runner.infer(obs)  # call 8: refresh (3rd)
    reused = runner.infer(later_samples(obs))  # call 9: reuses VL, fresh sensor samples
    assert runner.vl_calls == 3 and not reused["vl_fresh"] and reused["vl_age_s"] >= 0
    assert not np.allclose(base["actions"], reused["actions"])


def test_stale_features_are_refreshed(checkpoint, synth_dataset_dir):
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=100, max_vl_age_s=0.0)
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
    obs = obs_from_dataset(ds, 0)
    runner.infer(obs)
    runner.infer(obs)
    assert runner.vl_calls == 2  # the bound on feature age forces a refresh


def test_server_with_real_runner(checkpoint, synth_dataset_dir):
    from sensorvla.serving.client import PolicyClient
    from sensorvla.serving.protocol import PolicyServerError
    from sensorvla.serving.server import PolicyServer

    runner = PolicyRunner.from_pretrained(checkpoint)
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
    obs = obs_from_dataset(ds, 5)
    local = runner.infer(obs)["actions"]
    with PolicyServer(runner, port=0).start() as server, PolicyClient(port=server.port) as client:
        assert client.metadata["horizon"] == runner.cfg.model.head.horizon
        reply = client.infer({**obs, "images": obs["images"].astype(np.uint8)})
        np.testing.assert_allclose(reply["actions"], local, rtol=1e-5, atol=1e-6)
        with pytest.raises(PolicyServerError):
            client.infer({**obs, "state": np.full(3, np.nan, np.float32)})
        again = client.infer(obs)
        np.testing.assert_allclose(again["actions"], local, rtol=1e-5, atol=1e-6)


def test_background_vl_refresh(checkpoint, synth_dataset_dir):
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=2, background_vl=True, max_vl_age_s=60.0)
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
    obs = obs_from_dataset(ds, 1)
    first = runner.infer(obs)
    assert first["vl_fresh"] and runner.vl_calls == 1  # nothing cached yet: computed inline
    outs = [runner.infer(obs) for _ in range(5)]
    runner.session.join_background()  # wait for the background refresh to land
    assert not any(o["vl_fresh"] for o in outs)  # every later call used cached features
    assert runner.vl_calls >= 2  # refreshes happened off the control path


@pytest.fixture(scope="module")
def moved_checkpoint(tmp_path_factory, tiny_vl_dir, synth_dataset_dir):
    """A checkpoint whose recorded backbone folder has moved away (a copy on another machine)."""
    import shutil

    root = tmp_path_factory.mktemp("moved")
    old_vl = shutil.copytree(tiny_vl_dir, root / "old_place" / "vl")
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(old_vl)
    cfg.model.head.type = "regression"
    cfg.data.dataset_dir = str(synth_dataset_dir)
    cfg = resolve_from_meta(cfg, load_meta(synth_dataset_dir))
    torch.manual_seed(1)
    ckpt = save_pretrained(
        build_policy(cfg), root / "pretrained_model", cfg, compute_stats(synth_dataset_dir, progress=False)
    )
    new_vl = root / "new_place" / "vl"
    new_vl.parent.mkdir()
    shutil.move(old_vl, new_vl)
    return ckpt, new_vl


def test_moved_backbone_fails_naming_vl_model_and_the_override_loads(moved_checkpoint):
    from sensorvla.models.backbone import BackboneLoadError

    ckpt, new_vl = moved_checkpoint
    with pytest.raises(BackboneLoadError, match="--vl-model PATH"):
        PolicyRunner.from_pretrained(ckpt)
    runner = PolicyRunner.from_pretrained(ckpt, vl_model=str(new_vl))
    assert runner.metadata["vl_model"] == str(new_vl)


def test_serve_cli_with_vl_model_override_healthz_and_infer(moved_checkpoint, synth_dataset_dir):
    """`sensorvla serve --vl-model` serves a checkpoint whose recorded backbone path no longer exists."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from sensorvla.serving.client import PolicyClient

    ckpt, new_vl = moved_checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sensorvla.cli", "serve", "--checkpoint", str(ckpt), "--port", str(port)]
    cmd += ["--token", "s3cret", "--vl-model", str(new_vl), "--max-queue", "3"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a bound on a hung start, not a timing assertion
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError as e:
                if time.monotonic() > deadline or proc.poll() is not None:
                    msg = proc.stderr.read() if proc.poll() is not None else "server did not start"
                    raise AssertionError(msg) from e
                time.sleep(0.3)
        runner = PolicyRunner.from_pretrained(ckpt, vl_model=str(new_vl))
        ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
        obs = obs_from_dataset(ds, 2)
        with PolicyClient(port=port, token="s3cret") as client:
            assert client.metadata["vl_model"] == str(new_vl)
            assert client.metadata["protocol"]["max_queue"] == 3
            reply = client.infer(obs)
        np.testing.assert_allclose(reply["actions"], runner.infer(obs)["actions"], rtol=1e-5, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
