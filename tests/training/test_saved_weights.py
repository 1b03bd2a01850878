"""What a stage-2 run saves is what it trained: with --model.finetune.full-vision the trained vision tower
goes to the seed file and to pretrained_model/, and loading the folder gives those weights back."""

from __future__ import annotations

import copy

import torch
from test_train import metric_rows, tiny_cfg

from sensorvla.config import resolve_from_meta
from sensorvla.data.format import load_meta
from sensorvla.models.folder import WEIGHTS_NAME, read_config, read_safetensors
from sensorvla.models.policy import build_policy, load_pretrained
from sensorvla.models.seed_checkpoint import tensors_sha256
from sensorvla.training.loop import train


def test_full_vision_stage2_saves_and_reloads_the_trained_tower(tmp_path, tiny_vl_dir, synth_dataset_dir):
    train(tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "s1", max_steps=1), progress=False)
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "s2", max_steps=2, vision_lr=1e-2)
    cfg.train.stage, cfg.model.finetune.full_vision = "stage2", True
    cfg.train.stage1_checkpoint = str(tmp_path / "s1" / "checkpoints" / "qwen_vla_sensor_best.pt")
    train(cfg, progress=False)
    seed = torch.load(tmp_path / "s2" / "checkpoints" / "qwen_vla_sensor_best.pt", weights_only=True)
    vision = {k: v for k, v in seed["model_state_dict"].items() if k.startswith("backbone.model.visual.")}
    assert vision, "the trained vision tower is missing from the stage-2 seed file"
    fresh = build_policy(resolve_from_meta(copy.deepcopy(cfg).validate(), load_meta(synth_dataset_dir))).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in vision.items())  # it trained
    loaded, _, _ = load_pretrained(tmp_path / "s2" / "checkpoints" / "pretrained_model")
    sd = loaded.state_dict()
    different = [k for k, v in vision.items() if not torch.equal(sd[k], v)]
    assert not different, different[:5]


def _trained_stage1(tmp_path, vl_dir, data_dir, **finetune):
    """A one-step stage 1 that trains the backbone as `finetune` says (e.g. full_vision=True); its run dir."""
    cfg = tiny_cfg(vl_dir, data_dir, tmp_path / "s1", max_steps=1, vision_lr=1e-2, vl_lr=1e-2)
    for k, v in finetune.items():
        setattr(cfg.model.finetune, k, v)
    train(cfg, progress=False)
    return tmp_path / "s1"


def test_a_vision_tower_trained_in_stage1_reaches_stage2(tmp_path, tiny_vl_dir, synth_dataset_dir):
    s1 = _trained_stage1(tmp_path, tiny_vl_dir, synth_dataset_dir, full_vision=True)
    saved = read_safetensors(s1 / "checkpoints" / "pretrained_model" / WEIGHTS_NAME)
    tower = {k: v for k, v in saved.items() if k.startswith("backbone.model.visual.")}
    base = build_policy(read_config(s1 / "checkpoints" / "pretrained_model")).state_dict()  # the base tower
    assert any(not torch.equal(v, base[k]) for k, v in tower.items()), "stage 1 trained the tower"
    s1_best = s1 / "checkpoints" / "qwen_vla_sensor_best.pt"
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "s2", max_steps=1)
    cfg.train.stage, cfg.train.stage1_checkpoint, cfg.model.finetune.full_vision = "stage2", str(s1_best), True
    train(cfg, progress=False)
    # the trainer's record of what the policy held right after loading the stage-1 file (hashed from the policy)
    init = [r for r in metric_rows(tmp_path / "s2") if r["kind"] == "stage1_init"][-1]
    assert init.get("vl_backbone_sha256") == tensors_sha256(tower), "stage 2 started from the base tower"
