"""A checkpoint written before declared sensor streams (one tensor: force channels first, then the A-scan) loads
as two declared streams and gives the actions it gave then (tests/fixtures/legacy_checkpoint/make_fixture.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sensorvla.models.policy import load_pretrained

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_checkpoint"


def test_legacy_checkpoint_gives_the_recorded_actions(tiny_vl_dir):
    policy, cfg, _ = load_pretrained(FIXTURE / "folder", vl_model=str(tiny_vl_dir))
    batch = load_file(FIXTURE / "batch.safetensors")
    recorded = batch.pop("actions")
    actions = policy.eval().predict_chunk(batch)
    assert torch.equal(actions, recorded)  # bit-equal: the same computation in the same order
