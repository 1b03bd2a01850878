"""Fixtures of the inference tests: an untrained checkpoint saved and loaded exactly like a trained one."""

from __future__ import annotations

import pytest
import torch

from sensorvla.config import SensorVLAConfig, resolve_from_meta
from sensorvla.data.format import load_meta
from sensorvla.data.normalize import compute_stats
from sensorvla.models.folder import save_pretrained
from sensorvla.models.policy import build_policy


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tiny_vl_dir, synth_dataset_dir):
    """An untrained diffusion-head checkpoint (4 sampling steps) on the synthetic dataset."""
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.model.head.type = "diffusion"
    cfg.model.head.num_inference_steps = 4
    cfg.data.dataset_dir = str(synth_dataset_dir)
    cfg = resolve_from_meta(cfg, load_meta(synth_dataset_dir))
    torch.manual_seed(0)
    policy = build_policy(cfg)
    out = tmp_path_factory.mktemp("ckpt") / "pretrained_model"
    save_pretrained(policy, out, cfg, compute_stats(synth_dataset_dir, progress=False))
    return out
