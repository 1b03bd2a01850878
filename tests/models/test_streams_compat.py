"""A checkpoint written before declared sensor streams (one tensor: force channels first, then the A-scan) loads
as two declared streams and gives the actions it gave then (tests/fixtures/legacy_checkpoint/make_fixture.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sensorvla.models.policy import load_pretrained

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_checkpoint"


@pytest.fixture(autouse=True)
def one_thread():
    """The recorded actions were computed with one intra-op thread; bit-equality holds for the same thread count
    (two threads split the reductions differently: a last-bit difference, not a behaviour change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_legacy_checkpoint_gives_the_recorded_actions(tiny_vl_dir):
    policy, cfg, _ = load_pretrained(FIXTURE / "folder", vl_model=str(tiny_vl_dir))
    batch = load_file(FIXTURE / "batch.safetensors")
    recorded = batch.pop("actions")
    actions = policy.eval().predict_chunk(batch)
    assert torch.equal(actions, recorded)  # bit-equal: the same computation in the same order


def test_legacy_seed_stage1_file_gives_the_recorded_actions(tiny_vl_dir):
    """The seed guide's stage-1 `.pt` of the same weights (sensor_encoder + action_expert sections, old key names)."""
    from sensorvla.models.folder import read_config
    from sensorvla.models.policy import build_policy
    from sensorvla.models.seed_checkpoint import load_stage1_into

    cfg = read_config(FIXTURE / "folder")
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    torch.manual_seed(123)  # other initial weights: every trained tensor must come from the file
    policy = build_policy(cfg)
    load_stage1_into(policy, FIXTURE / "stage1.pt")
    batch = load_file(FIXTURE / "batch.safetensors")
    recorded = batch.pop("actions")
    assert torch.equal(policy.eval().predict_chunk(batch), recorded)
