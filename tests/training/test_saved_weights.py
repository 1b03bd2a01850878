"""What a stage-2 run saves is what it trained: with --model.finetune.full-vision the trained vision tower
goes to the seed file and to pretrained_model/, and loading the folder gives those weights back."""

from __future__ import annotations

import copy

import torch
from test_train import tiny_cfg

from sensorvla.config import resolve_from_meta
from sensorvla.data.format import load_meta
from sensorvla.models.policy import build_policy, load_pretrained
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
