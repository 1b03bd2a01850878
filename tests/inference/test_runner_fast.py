"""Fast-slow inference reuses the VL features and their projections (backbone.project, fusion.project_vl):
the actions equal those of a runner that recomputes everything from the same images."""

from __future__ import annotations

import numpy as np
import pytest

from sensorvla.eval.latency import _obs, _runner


@pytest.mark.parametrize("head", ["regression", "flow"])
def test_reused_vl_projection_equals_recomputing_it(tiny_vl_dir, head):
    fast = _runner(tiny_vl_dir, head, 1, "fast_slow", "cpu", 33, 56, (4, 2))
    full = _runner(tiny_vl_dir, head, 1, "full", "cpu", 33, 56, (4, 2))
    obs = _obs(1, 33, 56, np.random.default_rng(0))
    ts = obs["sensor_timestamps"][-1] + np.arange(1, 41) / 650.0
    later = dict(obs, sensor=np.random.default_rng(1).normal(size=(40, 33)).astype(np.float32))
    later.update(sensor_timestamps=ts, timestamp=np.float64(ts[-1]))
    a1, b1 = fast.infer(obs), full.infer(obs)
    cached = fast._vl_projected
    a2, b2 = fast.infer(later), full.infer(later)
    assert a1["vl_fresh"] and not a2["vl_fresh"] and b2["vl_fresh"]
    assert fast._vl_projected is cached  # the second call reused the projections, it did not recompute them
    assert full._vl_projected is not None and full._vl_projected[0] is not cached[0]
    np.testing.assert_allclose(a1["actions"], b1["actions"], atol=1e-6)
    np.testing.assert_allclose(a2["actions"], b2["actions"], atol=1e-5)
    assert not np.allclose(a1["actions"], a2["actions"])  # the new sensor data did change the actions


@pytest.mark.parametrize("strategy", ["concat", "gated", "cross_attention"])
def test_fast_ticks_equal_the_policy_seam_for_every_fusion(tiny_vl_dir, strategy):
    """Where the fusion keeps the VL tokens (concat, gated) a fast tick reuses the head's Memory of them and
    projects keys / values for the sensor and state tokens only; cross_attention mixes the sensor into the VL
    tokens, so its ticks recompute the whole memory. Either way: the actions of `predict_chunk` on the batch."""
    import torch

    from sensorvla.models.fusion import build_fusion

    runner = _runner(tiny_vl_dir, "regression", 1, "fast_slow", "cpu", 33, 56, (4, 2))
    pol = runner.policy
    cfg = runner.cfg.model.fusion
    cfg.strategy = strategy
    torch.manual_seed(3)
    pol.fusion = build_fusion(cfg, pol.backbone.hidden_size, pol.sensor_encoder.out_dim, runner.cfg.model.state_dim)
    pol.eval()
    obs = _obs(1, 33, 56, np.random.default_rng(0))
    runner.infer(obs)
    v_mem = runner._vl_projected[3]
    assert (v_mem is not None) == (strategy != "cross_attention")
    ts = obs["sensor_timestamps"][-1] + np.arange(1, 41) / 650.0
    later = dict(obs, sensor=np.random.default_rng(1).normal(size=(40, 33)).astype(np.float32))
    later.update(sensor_timestamps=ts, timestamp=np.float64(ts[-1]))
    session = runner.session
    got = runner.infer(later)
    assert not got["vl_fresh"] and runner._vl_projected[3] is v_mem
    raw, _ = session.raw_sample(runner.check_request(later))  # the same window the tick used (history kept)
    batch = runner.batch_from_raw(raw)
    want = pol.predict_chunk(batch)[0].numpy()
    np.testing.assert_allclose(got["actions_normalized"], want, atol=1e-5)
