"""Sensor encoder and fusion specifics: the learned missing token, masking, sample independence,
channel splits, and that every fusion strategy really depends on the sensor."""

from __future__ import annotations

import pytest
import torch

from sensorvla.config import FusionConfig, SensorConfig
from sensorvla.data.timeline import SensorWindow
from sensorvla.models.fusion import build_fusion
from sensorvla.models.sensors.encoder import SensorEncoder
from sensorvla.streams import legacy_streams

B, T, C = 4, 16, 33


def legacy(cfg, t=T, c=C):
    """The encoder of the legacy sensor tensor (force channels first, then the A-scan) as two declared streams."""
    return SensorEncoder(cfg, legacy_streams(c, cfg.force_channels), SensorWindow(0.1, t, 0.02))


def batch(sensor, mask, has):
    return {"sensor": sensor, "sensor_mask": mask, "has_sensor": has}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    sensor = torch.randn(B, T, C, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :5] = False
    has = torch.tensor([True, True, False, True])
    return sensor, mask, has


def test_missing_sensor_uses_the_learned_token_and_it_trains():
    torch.manual_seed(0)
    enc = legacy(SensorConfig(num_tokens=4, hidden_dim=32, num_heads=4)).eval()
    sensor, mask, has = inputs()
    tok, tok_mask = enc(batch(sensor, mask, has))
    assert tok.shape == (B, 4, 32) and tok_mask.all()
    missing = enc.groups["sensor"].missing_tokens
    assert torch.equal(tok[2], missing[0])  # not an encoding of zeros
    zeros_tok, _ = enc(batch(torch.zeros_like(sensor), mask, torch.ones(B, dtype=torch.bool)))
    assert not torch.allclose(zeros_tok[2], tok[2])
    tok.sum().backward()
    assert missing.grad is not None and missing.grad.abs().sum() > 0
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in enc.modules())


def test_masked_points_and_other_samples_do_not_matter():
    torch.manual_seed(0)
    enc = legacy(SensorConfig(num_tokens=4, hidden_dim=32, num_heads=4)).eval()
    sensor, mask, has = inputs()
    with torch.no_grad():
        ref, _ = enc(batch(sensor, mask, has))
        poked = sensor.clone()
        poked[1, :5] = 1e3  # masked grid points of sample 1
        poked[3] = -poked[3]  # another sample entirely
        out, _ = enc(batch(poked, mask, has))
    assert torch.allclose(out[1], ref[1], atol=1e-5)
    assert torch.allclose(out[0], ref[0], atol=1e-5) and not torch.allclose(out[3], ref[3])
    all_masked = torch.zeros_like(mask)
    with torch.no_grad():
        out, _ = enc(batch(sensor, all_masked, torch.ones(B, dtype=torch.bool)))
    assert torch.isfinite(out).all() and torch.equal(out[0], enc.groups["sensor"].missing_tokens[0])


@pytest.mark.parametrize("force", [0, 1, C])
def test_channel_paths(force):
    enc = legacy(SensorConfig(force_channels=force, num_tokens=2, hidden_dim=16, num_heads=2))
    embed = enc.groups["sensor"].embed
    assert ("force" not in embed) == (force == 0) and ("ascan" not in embed) == (force == C)
    sensor, mask, has = inputs()
    out, _ = enc(batch(sensor, mask, has))
    assert out.shape == (B, 2, 16) and torch.isfinite(out).all()


def test_original_1026_channels():
    enc = legacy(SensorConfig(num_tokens=4, hidden_dim=32, num_heads=4), 65, 1026)
    out, _ = enc(batch(torch.randn(2, 65, 1026), torch.ones(2, 65, dtype=torch.bool), torch.ones(2, dtype=torch.bool)))
    assert out.shape == (2, 4, 32)


@pytest.mark.parametrize("strategy", ["concat", "cross_attention", "gated"])
def test_every_fusion_depends_on_the_sensor(strategy):
    torch.manual_seed(0)
    fusion = build_fusion(FusionConfig(strategy=strategy, hidden_dim=32, num_heads=4), 48, 16, 6).eval()
    vl, vl_mask = torch.randn(2, 3, 48), torch.ones(2, 3, dtype=torch.bool)
    s, s_mask = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool)
    state = torch.randn(2, 6)
    cond, cond_mask = fusion(vl, vl_mask, s, s_mask, state)
    assert cond.shape == (2, 3 + 4 + 1, 32) and cond_mask.all()
    cond2, _ = fusion(vl, vl_mask, s + 1.0, s_mask, state)
    if strategy == "cross_attention":  # the VL tokens themselves attend to the sensor tokens
        assert not torch.allclose(cond[:, :3], cond2[:, :3])
    assert not torch.allclose(cond, cond2)


def test_vision_only_fusion_and_unknown_strategy():
    fusion = build_fusion(FusionConfig(hidden_dim=32, num_heads=4), 48, None, 6)
    cond, mask = fusion(torch.randn(2, 3, 48), torch.ones(2, 3, dtype=torch.bool), None, None, torch.randn(2, 6))
    assert cond.shape == (2, 4, 32) and mask.all()
    with pytest.raises(ValueError, match="--fusion-strategy"):
        build_fusion(FusionConfig(strategy="sum"), 48, 16, 6)  # type: ignore[arg-type]
