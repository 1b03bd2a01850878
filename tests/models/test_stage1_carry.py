"""Nothing stage 1 trains is lost in stage 2: every trainable tensor of a stage-1 policy (sensor encoder, fusion,
head, VL projection, keypoints, and the backbone tensors of a stage 1 that trains the backbone: the vision tower,
LoRA adapters, the full base) is in its seed file and reaches the stage-2 policy, or loading names the fix."""

from __future__ import annotations

import pytest
import torch

from sensorvla.config import SensorVLAConfig, resolve_from_meta
from sensorvla.data.format import load_meta
from sensorvla.models.folder import CheckpointMismatchError
from sensorvla.models.policy import build_policy
from sensorvla.models.seed_checkpoint import load_stage1_into
from sensorvla.training.checkpoint import save_seed_file, seed_payload

BACKBONE_KEY = "vl_backbone"  # the stage-1 seed file's section of trained backbone tensors (a file format: by hand)
# the seed guide's stage-1 keys, copied by hand: what a stage 1 with a frozen backbone writes
GUIDE_STAGE1_KEYS = {
    "epoch",
    "sensor_encoder",
    "action_expert",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "val_loss",
    "training_stage",
}


def _policy(vl_dir, data_dir, mode="none", targets="language", full_vision=False, lora_r=16, keypoints=0):
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.data.dataset_dir = str(data_dir)
    cfg.model.finetune.mode, cfg.model.finetune.lora_target_modules = mode, targets
    cfg.model.finetune.full_vision, cfg.model.finetune.lora_r = full_vision, lora_r
    if keypoints:
        cfg.model.backbone.pooling, cfg.model.backbone.keypoints = "all", keypoints
    return build_policy(resolve_from_meta(cfg, load_meta(data_dir)))


def _trained_stage1_file(tmp_path, policy) -> tuple[dict, str]:
    """Move every trainable tensor of `policy` off its initial value (a stand-in for stage-1 training) and write its
    stage-1 seed file as the trainer does; (the trained tensors by name, the file)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    trained = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    payload = seed_payload(policy, None, None, epoch=1, val_loss=0.5, stage="stage1")
    return trained, str(save_seed_file(tmp_path / "stage1.pt", payload))


def _canonical(name: str) -> str:
    return name.replace(".base_layer.", ".")  # PEFT wraps a Linear that gets LoRA: x.weight -> x.base_layer.weight


CARRIED = {
    "frozen backbone, keypoints": ({"keypoints": 4}, {"mode": "lora", "keypoints": 4}),
    "vision tower -> vision tower + LoRA": ({"full_vision": True}, {"mode": "lora", "full_vision": True}),
    "vision tower -> vision tower with LoRA on it": (
        {"full_vision": True},
        {"mode": "lora", "targets": "vision", "full_vision": True},
    ),
    "LoRA -> LoRA": ({"mode": "lora"}, {"mode": "lora"}),
    "LoRA on all + vision tower -> the same": (
        {"mode": "lora", "targets": "all", "full_vision": True},
        {"mode": "lora", "targets": "all", "full_vision": True},
    ),
    "full -> full": ({"mode": "full"}, {"mode": "full"}),
}


@pytest.mark.parametrize("stage1,stage2", list(CARRIED.values()), ids=list(CARRIED))
def test_every_tensor_stage1_trains_reaches_stage2(tmp_path, tiny_vl_dir, synth_dataset_dir, stage1, stage2):
    trained, path = _trained_stage1_file(tmp_path, _policy(tiny_vl_dir, synth_dataset_dir, **stage1))
    payload = torch.load(path, weights_only=True)
    saved = {**payload["sensor_encoder"], **payload["action_expert"], **payload.get(BACKBONE_KEY, {})}
    assert not set(trained) - set(saved), "a trained tensor is missing from the stage-1 seed file"
    if not stage1.get("mode") and not stage1.get("full_vision"):
        assert set(payload) == GUIDE_STAGE1_KEYS  # a frozen stage 1 writes exactly the seed guide's keys
    policy = _policy(tiny_vl_dir, synth_dataset_dir, **stage2)
    info = load_stage1_into(policy, path)
    own = {_canonical(k): v for k, v in policy.state_dict().items()}
    lost = [n for n, v in trained.items() if not torch.equal(own[_canonical(n)], v)]
    assert not lost, f"stage 2 does not start from these stage-1 weights: {lost[:5]}"
    assert ("vl_backbone_sha256" in info) == (BACKBONE_KEY in payload)


REFUSED = {
    "vision tower -> frozen tower": ({"full_vision": True}, {"mode": "lora"}, "--model.finetune.full-vision true"),
    "LoRA -> no LoRA": ({"mode": "lora"}, {"mode": "none", "full_vision": True}, "--finetune-vl lora with stage 1's"),
    "LoRA r 16 -> r 8": ({"mode": "lora"}, {"mode": "lora", "lora_r": 8}, "another shape.*lora-r"),
    "full -> LoRA": ({"mode": "full"}, {"mode": "lora"}, "--finetune-vl full"),
}


@pytest.mark.parametrize("stage1,stage2,fix", list(REFUSED.values()), ids=list(REFUSED))
def test_a_stage2_that_would_drop_stage1_backbone_weights_names_the_fix(
    tmp_path, tiny_vl_dir, synth_dataset_dir, stage1, stage2, fix
):
    _, path = _trained_stage1_file(tmp_path, _policy(tiny_vl_dir, synth_dataset_dir, **stage1))
    policy = _policy(tiny_vl_dir, synth_dataset_dir, **stage2)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=f"trained in stage 1.*{fix}"):
        load_stage1_into(policy, path)
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())  # nothing half-loaded
