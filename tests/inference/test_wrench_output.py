"""The wrench output (`--model.wrench-output.enabled`): a ConfigError without force channels, its loss falls on real
samples, an old config without it loads with the same actions, the run logs its loss, `eval offline` reports its L1
in physical units, and the runner and the server (through `PolicyClient`) reply with it."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from runner_helpers import obs_from_dataset

from sensorvla.config import ConfigError, SensorVLAConfig, resolve_from_meta
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import load_meta
from sensorvla.data.normalize import Normalizer, compute_stats
from sensorvla.eval.offline import evaluate, wrench_errors
from sensorvla.inference.runner import PolicyRunner
from sensorvla.integrity import write_manifest
from sensorvla.models.backbone import load_processor, pad_token_id
from sensorvla.models.folder import save_pretrained
from sensorvla.models.policy import build_policy, load_pretrained
from sensorvla.models.processor import PolicyProcessor, collate
from sensorvla.serving.client import PolicyClient
from sensorvla.serving.server import PolicyServer
from sensorvla.training.loop import train
from sensorvla.training.run_log import read_curves


def _cfg(vl_dir, data_dir, enabled=True) -> SensorVLAConfig:
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.data.dataset_dir = str(data_dir)
    cfg.model.wrench_output.enabled = enabled
    return cfg


def test_enabled_without_force_channels_is_a_config_error(tiny_vl_dir, synth_dataset_dir):
    meta = load_meta(synth_dataset_dir)
    assert resolve_from_meta(_cfg(tiny_vl_dir, synth_dataset_dir), meta).model.sensor.force_channels == 1
    for fields in ({"sensor_channels": 0}, {"force_channels": 0}):
        other = types.SimpleNamespace(**{**vars(meta), **fields})
        with pytest.raises(ConfigError, match=r"--model.wrench-output.enabled.*--model.wrench-output.no-enabled"):
            resolve_from_meta(_cfg(tiny_vl_dir, synth_dataset_dir), other)
        resolve_from_meta(_cfg(tiny_vl_dir, synth_dataset_dir, enabled=False), other)  # off: as before
    bad = _cfg(tiny_vl_dir, synth_dataset_dir)
    bad.model.wrench_output.weight = -0.5
    with pytest.raises(ConfigError, match="--model.wrench-output.weight"):
        bad.validate()


def _real_batches(vl_dir, data_dir, cfg, n=2, b=8):
    """`n` batches of real samples with sensor data through the training transform chain."""
    ds = EpisodeDataset(data_dir, cfg.data, split="all", load_images=True)
    stats = compute_stats(data_dir, progress=False)
    proc = load_processor(str(vl_dir), min_pixels=56 * 56, max_pixels=112 * 112)
    transform = PolicyProcessor(Normalizer(stats), proc, "{instruction}", cfg.model.state_dim)
    picked = [i for i in range(0, len(ds), 3) if ds[i]["wrench_target_mask"].any()][: n * b]
    items = [transform(ds[i]) for i in picked]
    return [collate(items[k * b : (k + 1) * b], pad_token_id(proc)) for k in range(n)]


def test_the_wrench_loss_falls_on_real_samples(tiny_vl_dir, synth_dataset_dir):
    cfg = resolve_from_meta(_cfg(tiny_vl_dir, synth_dataset_dir), load_meta(synth_dataset_dir))
    cfg.model.wrench_output.weight = 1.0
    cfg.model.finetune.mode = "none"
    batches = _real_batches(tiny_vl_dir, synth_dataset_dir, cfg)
    assert batches[0]["wrench_target"].shape == (8, cfg.data.horizon, 1)
    torch.manual_seed(0)
    policy = build_policy(cfg)
    assert policy.wrench_head is not None
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)

    def wrench_loss() -> float:
        policy.eval()
        with torch.no_grad():
            out = float(np.mean([policy(b)[1]["loss_wrench"] for b in batches]))
        policy.train()
        return out

    before = wrench_loss()
    for step in range(40):
        loss, metrics = policy(batches[step % 2])
        assert metrics["n_wrench"] == 8 and "loss_wrench" in metrics
        opt.zero_grad()
        loss.backward()
        assert policy.wrench_head.out[1].weight.grad.abs().sum() > 0
        opt.step()
    assert wrench_loss() < 0.4 * before  # measured: 0.86 -> about 0.15


def test_old_config_without_the_section_loads_with_the_same_actions(tiny_vl_dir, synth_dataset_dir, tmp_path):
    """A checkpoint whose config.json has no `wrench_output` (saved before it existed) loads with it off: the same
    tensors, no wrench head, the same actions, and no `wrench` in the runner's reply or handshake."""
    cfg = resolve_from_meta(_cfg(tiny_vl_dir, synth_dataset_dir, enabled=False), load_meta(synth_dataset_dir))
    cfg.model.head.type = "diffusion"
    cfg.model.head.num_inference_steps = 2
    torch.manual_seed(0)
    policy = build_policy(cfg)
    assert policy.wrench_head is None and not any(k.startswith("wrench_head.") for k in policy.state_dict())
    out = tmp_path / "pretrained_model"
    save_pretrained(policy, out, cfg, compute_stats(synth_dataset_dir, progress=False))
    saved = json.loads((out / "config.json").read_text())
    del saved["model"]["wrench_output"]
    (out / "config.json").write_text(json.dumps(saved))
    write_manifest(out)  # as the older version wrote it
    loaded, loaded_cfg, _ = load_pretrained(out)
    assert loaded_cfg.model.wrench_output == dataclasses.replace(cfg.model.wrench_output)
    assert loaded.wrench_head is None
    batch = _real_batches(tiny_vl_dir, synth_dataset_dir, cfg, n=1, b=4)[0]
    want = policy.eval().predict_chunk(batch, generator=torch.Generator().manual_seed(3))
    got = loaded.eval().predict_chunk(batch, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set(loaded.eval().predict(batch, generator=torch.Generator().manual_seed(3))) == {"actions"}
    runner = PolicyRunner.from_pretrained(out)
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
    assert "wrench" not in runner.infer(obs_from_dataset(ds, 3)) and "wrench_channels" not in runner.metadata


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vl_dir, synth_dataset_dir):
    """A few steps of `sensorvla train` with the wrench output on the synthetic dataset (1 force channel)."""
    out = tmp_path_factory.mktemp("trained_wrench")
    cfg = _cfg(tiny_vl_dir, synth_dataset_dir)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps = 16, 1, 3
    cfg.train.tensorboard, cfg.train.log_every_steps = False, 1
    train(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def runner(trained):
    return PolicyRunner.from_pretrained(trained / "checkpoints" / "pretrained_model")


def test_the_run_logs_the_wrench_loss_apart(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 3 and all(r["loss_wrench"] > 0 for r in train_rows)
    assert [r for r in rows if r["kind"] == "val"][-1]["val_loss_wrench"] > 0
    curves = read_curves(trained / "metrics.jsonl")
    assert len(curves["loss_wrench"]) == 3 and len(curves["val_loss_wrench"]) == 1
    saved = json.loads((trained / "checkpoints" / "pretrained_model" / "config.json").read_text())
    assert saved["model"]["wrench_output"]["enabled"] is True


def test_eval_reports_the_wrench_l1_in_physical_units(runner, trained, synth_dataset_dir, tmp_path):
    m = evaluate(trained, synth_dataset_dir, out_dir=tmp_path, max_samples=12, progress=False, runner=runner)
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="test", load_images=True)
    raws = [ds[i] for i in range(12)]
    batch = collate([runner.transform(r) for r in raws], pad_token_id(runner.processor))
    pred = runner.policy.predict(batch, generator=torch.Generator().manual_seed(0))["wrench"].numpy()
    pred = runner.normalizer.unnormalize("wrench", pred)  # (N, H, 1) in the sensor's units
    gt = np.stack([r["wrench_target"] for r in raws])
    mask = np.stack([r["wrench_target_mask"] for r in raws])
    want = np.abs(pred - gt)[mask].mean()
    assert m["wrench_l1"] == m["wrench"]["l1"] == pytest.approx(float(want), rel=1e-5)
    assert m["wrench"]["num_steps"] == int(mask.sum()) > 0
    assert "wrench_l1" in (tmp_path / "report.md").read_text()
    # steps past the episode end / in sensor gaps are left out (their target is a placeholder)
    mask[:, -2:] = False
    gt[:, -2:] = 1e6
    e = wrench_errors(pred, gt, mask)
    assert e["l1"] == pytest.approx(float(np.abs(pred - gt)[mask].mean()), rel=1e-6)
    assert e["num_steps"] == int(mask.sum()) and e["l1_per_step"][-1] == 0.0


def test_the_runner_and_the_server_reply_with_the_wrench(runner, synth_dataset_dir):
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
    obs = obs_from_dataset(ds, 5)
    reply = runner.session.infer(obs)
    runner.reset()
    h = runner.cfg.model.head.horizon
    assert reply["wrench"].shape == (h, 1) and reply["wrench"].dtype == np.float32
    # the hand path: the batch the runner builds, the policy's wrench, un-normalized
    batch = runner.prepare(obs)
    want = runner.normalizer.unnormalize("wrench", runner.policy.predict(batch)["wrench"][0].numpy())
    np.testing.assert_allclose(reply["wrench"], want, rtol=1e-5, atol=1e-6)
    with PolicyServer(runner).start() as server, PolicyClient(port=server.port, timeout=120) as client:
        assert client.wrench_channels == 1
        got = client.infer(obs)
    np.testing.assert_array_equal(got["wrench"], reply["wrench"])
    np.testing.assert_array_equal(got["actions"], reply["actions"])


def test_the_exported_tick_carries_the_wrench(runner, synth_dataset_dir):
    """The runner's tick (`inference/tick.py`) returns (chunk, wrench) for a policy with the wrench output, and its
    `torch.export` graph (what `compile_model` compiles) gives both as eager does, gaps and no sensor data included."""
    from test_tick import tick_inputs, variants
    from torch.export import export

    from sensorvla.inference.tick import dynamic_shapes

    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")
    inputs = tick_inputs(runner, obs_from_dataset(ds, 5))
    runner.reset()
    with torch.no_grad():
        graph = export(runner.tick, tuple(inputs), dynamic_shapes=dynamic_shapes(inputs)).module()
        wrenches = {}
        for name, args in variants(inputs).items():
            (chunk, wrench), (g_chunk, g_wrench) = runner.tick(*args), graph(*args)
            assert wrench.shape == (1, runner.cfg.model.head.horizon, 1)
            torch.testing.assert_close(g_chunk, chunk, atol=1e-5, rtol=1e-5, msg=name)
            torch.testing.assert_close(g_wrench, wrench, atol=1e-5, rtol=1e-5, msg=name)
            wrenches[name] = wrench
    assert not torch.allclose(wrenches["measured"], wrenches["no_sensor"])  # the wrench reads the sensor tokens
