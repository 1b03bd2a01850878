"""The training loop in-process on CPU: cache equivalence, resume equality, crash safety, param groups,
overfitting for each head, NaN handling."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sensorvla.config import SensorVLAConfig
from sensorvla.data.format import load_meta
from sensorvla.models.pretrained import build_policy, resolve_from_meta
from sensorvla.training import checkpoint as ckpt
from sensorvla.training.feature_cache import StaleCacheError
from sensorvla.training.loop import TrainingDivergedError, train
from sensorvla.training.param_groups import build_param_groups


def tiny_cfg(vl_dir, data_dir, out, head="regression", **train_kw) -> SensorVLAConfig:
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.head.type = head
    cfg.model.head.num_inference_steps = 4
    cfg.data.dataset_dir = str(data_dir)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size = 8
    cfg.train.grad_accum_steps = 2
    cfg.train.epochs = 1
    cfg.train.log_every_steps = 1
    cfg.train.tensorboard = False
    cfg.train.use_cache = "never"
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_cached_stage1_equals_uncached(tmp_path, tiny_vl_dir, synth_dataset_dir):
    base = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "plain", max_steps=3)
    train(base)
    cached = copy.deepcopy(base)
    cached.train.output_dir = str(tmp_path / "cached")
    cached.train.cache_dtype = "float32"
    build = copy.deepcopy(cached)
    build.train.mode = "cache"
    out = train(build)
    assert Path(out["cache_dir"]).exists()
    cached.train.use_cache = "always"
    train(cached)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert a.keys() == b.keys() == {1, 2, 3}
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5)
    # a fingerprint change (another prompt template) makes the cache stale: it raises, never reused
    stale = copy.deepcopy(cached)
    stale.model.backbone.prompt_template = "Task: {instruction}"
    with pytest.raises(StaleCacheError, match="sensorvla train --mode cache"):
        train(stale)
    # a partial cache raises with the command that resumes building it
    index_path = next(Path(out["cache_dir"]).glob("shard-0-of-*.index.json"))
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({"ids": index["ids"][:1], "offsets": index["offsets"][:2]}))
    with pytest.raises(StaleCacheError, match="partial"):
        train(cached)


def test_resume_equals_uninterrupted(tmp_path, tiny_vl_dir, synth_dataset_dir):
    full = tiny_cfg(
        tiny_vl_dir, synth_dataset_dir, tmp_path / "full", head="diffusion", max_steps=6, save_every_steps=3
    )
    train(full)
    part = copy.deepcopy(full)
    part.train.output_dir = str(tmp_path / "part")
    part.train.max_steps = 3
    train(part)
    resumed = copy.deepcopy(part)
    resumed.train.max_steps = 6
    resumed.train.resume = True
    train(resumed)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert set(b) == set(a) == set(range(1, 7))
    for s in range(1, 7):
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (s, a, b)


def test_sigkill_then_resume(tmp_path, tiny_vl_dir, synth_dataset_dir):
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, epochs=50, save_every_steps=2)
    cfg.train.batch_size, cfg.train.grad_accum_steps = 4, 1
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    code = (
        "import sys; from sensorvla.config import SensorVLAConfig; from sensorvla.training.loop import train;"
        "train(SensorVLAConfig.load(sys.argv[1]), progress=False)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "cfg.json")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    best = tmp_path / "checkpoints" / ckpt.BEST_NAME
    deadline = time.time() + 240
    while time.time() < deadline and not (best.exists() and len(losses(tmp_path)) >= 30):
        time.sleep(0.2)
    assert best.exists(), "no best checkpoint was written before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    steps_done = max(losses(tmp_path))
    state = json.loads((tmp_path / "checkpoints" / "last" / "training_state.json").read_text())
    assert steps_done - state["step"] <= 2  # at most the work since the last checkpoint is lost
    best_ckpt = torch.load(best, weights_only=True)  # `best` is intact
    assert best_ckpt["training_stage"] == "stage1"
    resumed = copy.deepcopy(cfg)
    resumed.train.resume = True
    resumed.train.max_steps = state["step"] + 2
    out = train(resumed, progress=False)
    assert out["steps"] == state["step"] + 2


def test_param_groups_and_trainable_sets_by_stage(tiny_vl_dir, synth_dataset_dir, tmp_path):
    for stage, mode, expected in [
        ("stage1", "none", {"head", "fusion", "sensor_encoder"}),
        ("stage2", "lora", {"head", "fusion", "sensor_encoder", "vl_lora"}),
        ("stage2", "full", {"head", "fusion", "sensor_encoder", "vision", "language"}),
    ]:
        cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path)
        cfg.train.stage, cfg.model.finetune.mode = stage, mode
        cfg.train.stage1_checkpoint = "unused.pt"
        cfg = resolve_from_meta(cfg, load_meta(synth_dataset_dir))
        policy = build_policy(cfg)
        groups = build_param_groups(policy, cfg.train)
        names = {g["name"].split("/")[0] for g in groups}
        assert names == expected, (stage, mode, names)
        lr = {g["name"]: g["lr"] for g in groups}
        assert lr["sensor_encoder"] == cfg.train.sensor_lr and lr["head"] == cfg.train.lr
        if mode == "lora":
            assert lr["vl_lora"] == cfg.train.vl_lr
            assert all("lora_" in n for g in groups if g["name"].startswith("vl_lora") for n in g["param_names"])
        if mode == "full":
            assert lr["vision"] == cfg.train.vision_lr and lr["language"] == cfg.train.vl_lr
        assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("no_decay"))
        in_groups = [n for g in groups for n in g["param_names"]]
        assert sorted(in_groups) == sorted(n for n, p in policy.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("head", ["regression", "diffusion", "flow"])
def test_two_stage_overfit(tmp_path, tiny_vl_dir, synth_dataset_dir, head):
    torch.manual_seed(0)
    s1 = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "s1", head=head, epochs=6)
    s1.train.lr = s1.train.sensor_lr = 2e-3
    s1.train.batch_size, s1.train.grad_accum_steps = 16, 1
    s1.data.dataset_dir = str(synth_dataset_dir)
    r1 = train(s1, progress=False)
    l1 = r1["train_loss"]
    assert np.mean(l1[-3:]) < 0.5 * np.mean(l1[:3]), (l1[:3], l1[-3:])
    s2 = copy.deepcopy(s1)
    s2.train.output_dir = str(tmp_path / "s2")
    s2.train.stage, s2.model.finetune.mode = "stage2", "lora"
    s2.train.stage1_checkpoint = str(tmp_path / "s1" / "checkpoints" / ckpt.BEST_NAME)
    s2.train.epochs = 2
    s2.train.lr = s2.train.sensor_lr = 5e-4
    r2 = train(s2, progress=False)
    # stage 2 starts where stage 1 ended (far below stage 1's start) and does not lose it: its validation
    # loss (fixed noise draws) stays at stage 1's level or better
    assert r2["train_loss"][0] < 0.6 * np.mean(l1[:3])
    assert min(r2["val_loss"]) <= 1.2 * min(r1["val_loss"]), (r1["val_loss"], r2["val_loss"])


def test_nan_loss_stops_and_keeps_last_good(tmp_path, tiny_vl_dir, synth_dataset_dir, monkeypatch):
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, max_steps=4, save_every_steps=1)
    from sensorvla.models.policy import VLAPolicy

    orig = VLAPolicy.forward
    calls = {"n": 0}

    def poisoned(self, batch, sensor_loss_weight=1.0):
        loss, m = orig(self, batch, sensor_loss_weight)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), m

    monkeypatch.setattr(VLAPolicy, "forward", poisoned)
    with pytest.raises(TrainingDivergedError, match="last good checkpoint"):
        train(cfg, progress=False)
    state = json.loads((tmp_path / "checkpoints" / "last" / "training_state.json").read_text())
    assert state["step"] == 2  # 2 micro-batches per step: steps 1-2 were good and saved
