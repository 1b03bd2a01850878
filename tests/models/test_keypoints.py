"""Keypoint VL tokens (issue 18, item 4): a spatial softmax over each view's token map gives K keypoint tokens per
view at their expected (row, col), through the trainable `project` step, so the `all` cache and serving work."""

from __future__ import annotations

import copy

import pytest
import torch

from sensorvla.config import ConfigError, SensorVLAConfig, validate
from sensorvla.models.keypoints import KeypointTokens


def _grid_layout(b: int, views: int, h: int, w: int):
    """The `all` mode's layout: every view's h x w token centres, view-major, then the instruction token."""
    r, c = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    per_view = [torch.stack([torch.full((h * w,), float(v)), r.flatten(), c.flatten()], -1) for v in range(views)]
    pos = torch.cat([*per_view, torch.tensor([[-1.0, 0.0, 0.0]])])[None].expand(b, -1, -1)
    view = torch.cat([torch.arange(views).repeat_interleave(h * w), torch.tensor([views])])[None].expand(b, -1)
    return pos, view


def _peaked(kp: KeypointTokens, channel: int = 0, sharpness: float = 4.0) -> KeypointTokens:
    """Every keypoint scores feature `channel` (after the LayerNorm), sharply."""
    with torch.no_grad():
        kp.score.weight.zero_()
        kp.score.bias.zero_()
        kp.score.weight[:, channel] = 1.0
        kp.log_temperature.fill_(sharpness)
    return kp


def test_a_blob_gives_its_position_and_shapes():
    """A bright token at (row 2, col 5) of view 0 and (row 6, col 1) of view 1 of an 8 x 8 map: the keypoints sit
    on those token centres; a blob spread over two neighbouring tokens puts them between the centres."""
    b, v, h, w, d, k = 2, 2, 8, 8, 16, 3
    pos, view = _grid_layout(b, v, h, w)
    feats = torch.zeros(b, v * h * w + 1, d)
    feats[:, 2 * w + 5, 0] = 10.0
    feats[:, h * w + 6 * w + 1, 0] = 10.0
    feats[1, h * w + 6 * w + 2, 0] = 10.0  # sample 1: view 1's blob spans cols 1 and 2
    feats[:, -1] = 3.0  # the instruction token
    mask = torch.ones(b, v * h * w + 1, dtype=torch.bool)
    kp = _peaked(KeypointTokens(d, v, k))
    out, out_mask, out_pos = kp(feats, mask, pos, view)
    assert out.shape == (b, v * k + 1, d) and out_mask.shape == (b, v * k + 1) and out_pos.shape == (b, v * k + 1, 3)
    assert out_mask.all()
    torch.testing.assert_close(out_pos[0, :k], torch.tensor([[0.0, 2.5 / 8, 5.5 / 8]] * k), atol=1e-3, rtol=0)
    torch.testing.assert_close(out_pos[0, k : 2 * k], torch.tensor([[1.0, 6.5 / 8, 1.5 / 8]] * k), atol=1e-3, rtol=0)
    torch.testing.assert_close(out_pos[1, k : 2 * k], torch.tensor([[1.0, 6.5 / 8, 2.0 / 8]] * k), atol=1e-3, rtol=0)
    torch.testing.assert_close(out_pos[:, -1], torch.tensor([[-1.0, 0.0, 0.0]] * b))
    torch.testing.assert_close(out[:, -1], feats[:, -1])  # the instruction token passes through
    # the keypoint's feature is the blob's (the softmax-weighted mean) plus the keypoint's own embedding
    torch.testing.assert_close(out[0, 0] - kp.keypoint_emb[0], feats[0, 2 * w + 5], atol=1e-3, rtol=0)


def test_moving_the_blob_moves_only_its_views_keypoints_and_a_dropped_view_is_masked():
    b, v, h, w, d, k = 1, 2, 8, 8, 16, 4
    pos, view = _grid_layout(b, v, h, w)
    feats = torch.zeros(b, v * h * w + 1, d)
    feats[0, 3 * w + 3, 0] = 10.0
    feats[0, h * w + 4 * w + 4, 0] = 10.0
    mask = torch.ones(b, v * h * w + 1, dtype=torch.bool)
    kp = _peaked(KeypointTokens(d, v, k))
    _, _, before = kp(feats, mask, pos, view)
    moved = feats.clone()
    moved[0, 3 * w + 3, 0], moved[0, 3 * w + 6, 0] = 0.0, 10.0  # view 0's blob: col 3 -> col 6
    _, _, after = kp(moved, mask, pos, view)
    assert torch.allclose(after[0, :k, 2] - before[0, :k, 2], torch.full((k,), 3 / 8), atol=1e-3)
    torch.testing.assert_close(after[0, k:], before[0, k:])  # view 1 unchanged
    dropped = mask.clone()
    dropped[0, : h * w] = False  # view 0 masked (view dropout / a missing camera): no NaN, its keypoints masked
    out, out_mask, out_pos = kp(feats, dropped, pos, view)
    assert not out_mask[0, :k].any() and out_mask[0, k:].all()
    assert torch.isfinite(out).all() and torch.isfinite(out_pos).all()


def test_keypoints_need_a_spatial_token_mode():
    cfg = SensorVLAConfig()
    cfg.model.backbone.keypoints, cfg.model.backbone.pooling = 8, "view_mean"
    with pytest.raises(ConfigError, match="keypoints 8: a count >= 0, with the token mode grid or all"):
        validate(cfg)
    cfg.model.backbone.keypoints = -1
    cfg.model.backbone.pooling = "all"
    with pytest.raises(ConfigError, match="keypoints -1"):
        validate(cfg)


def _cfg(vl_dir, data_dir, out, keypoints: int, **train):
    from sensorvla.config import resolve_from_meta
    from sensorvla.data.format import load_meta

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.backbone.pooling, cfg.model.backbone.keypoints = "all", keypoints
    cfg.data.dataset_dir, cfg.train.output_dir = str(data_dir), str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.epochs = 8, 1, 1
    cfg.train.log_every_steps, cfg.train.tensorboard, cfg.train.use_cache = 1, False, "never"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return resolve_from_meta(cfg, load_meta(data_dir))


def test_keypoint_policy_tokens_and_the_all_cache(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """The policy's VL tokens are V * K + 1 keypoint tokens; stage 1 from the VL cache trains exactly as without it
    (the cache holds the `all` mode's tokens, the keypoints are computed after it), and the cache's key is the
    `all` mode's (one cache serves both)."""
    import json
    from pathlib import Path

    from sensorvla.models.policy import build_policy
    from sensorvla.training import feature_cache
    from sensorvla.training.loop import train

    cfg = _cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "plain", 4, max_steps=3)
    policy = build_policy(cfg)
    assert policy.backbone.num_tokens == cfg.model.num_views * 4 + 1
    assert {n for n, _ in policy.named_parameters() if ".keypoints." in n} >= {
        "backbone.keypoints.score.weight",
        "backbone.keypoints.log_temperature",
    }
    d, k = policy.backbone.hidden_size, 4
    pos, view = _grid_layout(2, cfg.model.num_views, 4, 4)
    feats = torch.randn(2, pos.shape[1], d)
    tokens, mask = policy.backbone.project(feats, torch.ones(pos.shape[:2], dtype=torch.bool), pos)
    assert tokens.shape == (2, cfg.model.num_views * k + 1, d) and mask.shape == (2, cfg.model.num_views * k + 1)
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    ref = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    cached = copy.deepcopy(cfg)
    cached.train.output_dir = str(tmp_path / "cached")
    build = copy.deepcopy(cached)
    build.train.mode, build.train.cache_dtype = "cache", "float32"
    train(build, progress=False)
    cached.train.use_cache, cached.train.cache_dtype = "always", "float32"
    train(cached, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    assert got.keys() == ref.keys() == {1, 2, 3}
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6)
    plain_all = copy.deepcopy(cached)
    plain_all.model.backbone.keypoints = 0
    ids = [0, 1, 2]
    assert feature_cache.fingerprint(plain_all, ids, "d") == feature_cache.fingerprint(cached, ids, "d")


def test_keypoint_checkpoint_serves_through_the_runner(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """A keypoint policy saved by training loads in `PolicyRunner` with its keypoint layer and answers an
    observation with an action chunk; its learnt keypoint weights are the trained ones."""
    import numpy as np

    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.training.loop import train

    cfg = _cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "run", 3, max_steps=2)
    train(cfg, progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "pretrained_model"
    runner = PolicyRunner.from_pretrained(ckpt)
    kp = runner.policy.backbone.keypoints
    assert kp is not None and kp.k == 3
    v = cfg.model.num_views
    rng = np.random.default_rng(0)
    obs = {
        "images": rng.integers(0, 255, (v, 64, 64, 3), dtype=np.uint8),
        "state": np.zeros(6, np.float32),
        "instruction": "insert the needle",
        "timestamp": 0.0,
    }
    chunk = runner.infer(obs)["actions"]
    assert np.isfinite(chunk).all() and chunk.shape == (cfg.model.head.horizon, 7)
    with torch.no_grad():  # the served actions go through the keypoint layer
        kp.score.weight.mul_(-3.0)
    runner.reset()
    assert not np.allclose(runner.infer(obs)["actions"], chunk, atol=1e-5)
