"""Vision that can learn: LoRA target presets, full fine-tuning of the vision tower, the `vision` LR group,
training-only image augmentation, and modality dropout."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from trainable import assert_trainable_set

from sensorvla.config import AugmentConfig, ConfigError, SensorVLAConfig, resolve_from_meta
from sensorvla.data.augment import ImageAugment
from sensorvla.data.format import load_meta
from sensorvla.models import finetune
from sensorvla.models.policy import build_policy
from sensorvla.training.param_groups import build_param_groups


def _cfg(vl_dir, data_dir, mode="lora", targets="language", full_vision=False) -> SensorVLAConfig:
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.data.dataset_dir = str(data_dir)
    cfg.model.finetune.mode = mode
    cfg.model.finetune.lora_target_modules = targets
    cfg.model.finetune.full_vision = full_vision
    return resolve_from_meta(cfg, load_meta(data_dir))


def _linear_names(policy) -> dict[str, set[str]]:
    base = policy.backbone.model
    names = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n}
    return {
        "vision": {n for n in names if n.startswith("visual.")},
        "language_attn": {
            n
            for n in names
            if n.startswith("language_model.") and n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"}
        },
    }


def _adapted(policy) -> set[str]:
    """Names of base-model modules that received LoRA adapters."""
    return {n.rsplit(".lora_A", 1)[0] for n, _ in policy.backbone.model.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize(
    "preset,expected", [("language", ["language_attn"]), ("vision", ["vision"]), ("all", ["language_attn", "vision"])]
)
def test_lora_presets_hit_exactly_the_intended_modules(tiny_vl_dir, synth_dataset_dir, preset, expected):
    plain = build_policy(_cfg(tiny_vl_dir, synth_dataset_dir, mode="none"))
    groups = _linear_names(plain)
    want = set().union(*(groups[g] for g in expected))
    assert want, "the tiny backbone has modules of each kind"
    policy = build_policy(_cfg(tiny_vl_dir, synth_dataset_dir, targets=preset))
    assert _adapted(policy) == want
    assert_trainable_set(policy, "lora")
    names = {g["name"].split("/")[0] for g in build_param_groups(policy, SensorVLAConfig().train)}
    assert ("vision" in names) == ("vision" in expected)
    assert ("vl_lora" in names) == ("language_attn" in expected)
    # the vision group's learning rate is --train.vision-lr
    tc = SensorVLAConfig().train
    tc.vision_lr = 7e-6
    lrs = {g["name"]: g["lr"] for g in build_param_groups(policy, tc)}
    assert all(lr == 7e-6 for k, lr in lrs.items() if k.startswith("vision"))


def test_regex_targets_still_work_and_zero_matches_is_an_error(tiny_vl_dir, synth_dataset_dir):
    policy = build_policy(_cfg(tiny_vl_dir, synth_dataset_dir, targets=r"visual\.blocks\.0\.attn\.qkv"))
    assert _adapted(policy) == {"visual.blocks.0.attn.qkv"}
    with pytest.raises(finetune.FinetuneError, match="matches no Linear module"):
        build_policy(_cfg(tiny_vl_dir, synth_dataset_dir, targets=r"nothing\.here"))
    with pytest.raises(finetune.FinetuneError, match="neither a preset"):
        build_policy(_cfg(tiny_vl_dir, synth_dataset_dir, targets="visual.(("))


def test_full_vision_trains_the_whole_tower_at_the_vision_lr(tiny_vl_dir, synth_dataset_dir):
    policy = build_policy(_cfg(tiny_vl_dir, synth_dataset_dir, mode="lora", full_vision=True))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    vision = {n for n, _ in policy.named_parameters() if n.startswith("backbone.model.visual.")}
    assert vision <= trainable
    language_base = {
        n for n, _ in policy.named_parameters() if n.startswith("backbone.model.language_model.") and "lora_" not in n
    }
    assert not (language_base & trainable)  # the language model itself stays frozen (LoRA only)
    assert_trainable_set(policy, "lora", full_vision=True)
    with pytest.raises(AssertionError, match="trainable set differs"):
        assert_trainable_set(policy, "lora", full_vision=False)
    groups = {g["name"]: g for g in build_param_groups(policy, SensorVLAConfig().train)}
    in_vision = {n for k, g in groups.items() if k.startswith("vision") for n in g["param_names"]}
    assert in_vision == vision


def test_frozen_base_stays_bit_equal_while_vision_trains(tiny_vl_dir, synth_dataset_dir):
    from sensorvla.data.normalize import compute_stats
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.processor import PolicyProcessor, collate
    from sensorvla.training.data_setup import build_normalizer, raw_dataset

    cfg = _cfg(tiny_vl_dir, synth_dataset_dir, mode="none", full_vision=True)
    policy = build_policy(cfg).train()
    before = {n: p.detach().clone() for n, p in policy.backbone.model.named_parameters()}
    proc = load_processor(str(tiny_vl_dir), min_pixels=56 * 56, max_pixels=224 * 224)
    tf = PolicyProcessor(
        build_normalizer(compute_stats(synth_dataset_dir, progress=False), cfg), proc, "{instruction}", 6
    )
    ds = raw_dataset(cfg, "train")
    batch = collate([tf(ds[i]) for i in range(4)], pad_token_id(proc))
    opt = torch.optim.AdamW([g for g in build_param_groups(policy, cfg.train)], lr=1e-2)
    for _ in range(2):
        loss, _ = policy(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(policy.backbone.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("visual.") for n in changed)


# ---------------------------------------------------------------------------------------------- augmentation


def _views(seed=0, n=2, hw=64):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (hw, hw, 3), dtype=np.uint8) for _ in range(n)]


def test_augment_shifts_and_jitters_deterministically():
    aug = ImageAugment(
        AugmentConfig(enabled=True, shift_frac=0.1, brightness=0.2, contrast=0.2, saturation=0.2), seed=3
    )
    views = _views()
    a, b = aug(views, sample_id=5, epoch=1), aug(views, sample_id=5, epoch=1)
    for x, y, v in zip(a, b, views):
        assert x.shape == v.shape and x.dtype == np.uint8
        np.testing.assert_array_equal(x, y)  # deterministic in (seed, epoch, sample id, view)
        assert not np.array_equal(x, v)
    assert not np.array_equal(aug(views, 5, 2)[0], a[0])  # another epoch, another draw
    assert not np.array_equal(a[0], aug([views[0], views[0]], 5, 1)[1])  # views draw independently


def test_shift_moves_content_by_at_most_the_pad():
    img = np.zeros((50, 50, 3), np.uint8)
    img[20:30, 20:30] = 255
    aug = ImageAugment(AugmentConfig(enabled=True, shift_frac=0.1, brightness=0, contrast=0, saturation=0))
    moved = set()
    for sid in range(40):
        out = aug([img], sid, 0)[0]
        ys, xs = np.nonzero(out[..., 0] == 255)
        assert out.sum() == img.sum()  # a pure shift: nothing scaled, nothing lost at this size
        moved.add((int(ys.min()) - 20, int(xs.min()) - 20))
    assert max(max(abs(a), abs(b)) for a, b in moved) <= 5 and len(moved) > 10


def test_augmentation_is_training_only(tiny_vl_dir, synth_dataset_dir, tmp_path):
    """The training loop's chain augments; validation and PolicyRunner never do."""
    from sensorvla.data.dataset import EpisodeDataset
    from sensorvla.data.normalize import compute_stats
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.models.backbone import load_processor
    from sensorvla.models.folder import save_pretrained
    from sensorvla.models.processor import PolicyProcessor
    from sensorvla.training.data_setup import build_normalizer

    cfg = _cfg(tiny_vl_dir, synth_dataset_dir, mode="none")
    cfg.data.augment.enabled = True
    stats = compute_stats(synth_dataset_dir, progress=False)
    norm = build_normalizer(stats, cfg)
    proc = load_processor(str(tiny_vl_dir), min_pixels=56 * 56, max_pixels=224 * 224)
    raw = EpisodeDataset(synth_dataset_dir, cfg.data, split="all")[3]
    plain = PolicyProcessor(norm, proc, "{instruction}", 6)(raw)
    augmented = PolicyProcessor(norm, proc, "{instruction}", 6, augment=ImageAugment(cfg.data.augment))(raw)
    assert not torch.equal(plain["pixel_values"], augmented["pixel_values"])
    save_pretrained(build_policy(cfg), tmp_path / "pm", cfg, stats)
    runner = PolicyRunner.from_pretrained(tmp_path / "pm")
    assert runner.transform.augment is None
    obs = {"images": np.stack(raw["images"]), "state": raw["state"], "instruction": raw["instruction"],
           "sensor": np.zeros((0, 33), np.float32), "sensor_timestamps": np.zeros(0), "timestamp": 0.0}  # fmt: skip
    served = runner.prepare(obs)
    torch.testing.assert_close(served["pixel_values"], plain["pixel_values"])


def test_augment_config_is_validated():
    cfg = SensorVLAConfig()
    cfg.data.augment.shift_frac = 0.7
    with pytest.raises(ConfigError, match="shift-frac"):
        cfg.validate()


# ------------------------------------------------------------------------------------------ modality dropout


def test_modality_dropout_probabilities_are_honoured(tiny_vl_dir, synth_dataset_dir):
    cfg = _cfg(tiny_vl_dir, synth_dataset_dir, mode="none")
    cfg = copy.deepcopy(cfg)
    cfg.model.view_dropout, cfg.model.sensor_dropout = 0.3, 0.6
    policy = build_policy(cfg).train()
    n = 4000
    batch = {"sensor": torch.zeros(n, 4, 33)}
    torch.manual_seed(0)
    view_keep, sensor_keep = policy.modality_keep(batch)
    assert view_keep.shape == (n, cfg.model.num_views) and sensor_keep.shape == (n,)
    drop_v, drop_s = 1 - view_keep.float().mean().item(), 1 - sensor_keep.float().mean().item()
    # binomial standard errors are < 0.01 here: 4 sigma bounds
    assert abs(drop_v - 0.3) < 0.03 and abs(drop_s - 0.6) < 0.04
    # views drop independently of each other and of the sensor
    both = (~view_keep[:, 0] & ~view_keep[:, 1]).float().mean().item()
    assert abs(both - 0.09) < 0.02
    assert policy.eval().modality_keep(batch) == (None, None)  # never at inference
    cfg.model.view_dropout = cfg.model.sensor_dropout = 0.0
    assert build_policy(cfg).train().modality_keep(batch) == (None, None)  # off by default


def test_sensor_dropout_uses_the_missing_token(tiny_vl_dir, synth_dataset_dir):
    cfg = _cfg(tiny_vl_dir, synth_dataset_dir, mode="none")
    cfg.model.backbone.pooling = "view_mean"  # fixed N_vl = V + 1 tokens, no positions needed
    cfg.model.sensor_dropout = 0.5
    policy = build_policy(cfg).train()
    b, d = 64, policy.backbone.hidden_size
    batch = {
        "vl_features": torch.randn(b, cfg.model.num_views + 1, d),
        "vl_mask": torch.ones(b, cfg.model.num_views + 1, dtype=torch.bool),
        "sensor": torch.randn(b, 32, 33),
        "sensor_mask": torch.ones(b, 32, dtype=torch.bool),
        "has_sensor": torch.ones(b, dtype=torch.bool),
        "state": torch.randn(b, 6),
    }
    seen = []
    policy.sensor_encoder.register_forward_hook(lambda m, args, out: seen.append((args[1].clone(), out[0].detach())))
    torch.manual_seed(1)
    policy.condition(batch)
    torch.manual_seed(1)
    _, keep = policy.modality_keep(batch)
    assert torch.equal(seen[-1][0], keep) and 0 < int(keep.sum()) < b
    missing = policy.sensor_encoder.groups["sensor"].missing_tokens.detach()
    assert torch.equal(seen[-1][1][~keep], missing.expand(int((~keep).sum()), -1, -1))  # dropped: the missing tokens


def test_dropout_config_is_validated():
    cfg = SensorVLAConfig()
    cfg.model.view_dropout = 1.0
    with pytest.raises(ConfigError, match="view-dropout"):
        cfg.validate()
    cfg.model.view_dropout = 0.2
    cfg.model.backbone.pooling = "resampler"
    with pytest.raises(ConfigError, match="per-view tokens"):
        cfg.validate()
