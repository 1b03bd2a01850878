"""Declared streams end to end on the built-in world: the synthetic task's tactile array (100 Hz) and IMU (1 kHz)
are found in the dataset, windowed per stream, normalized, encoded, kept in a history per stream by the runner
(which gives the training path's actions), checked by name, and streamed by name by the client."""

from __future__ import annotations

import numpy as np
import pytest

from sensorvla.config import SensorVLAConfig, resolve_from_meta
from sensorvla.data.dataset import EpisodeDataset
from sensorvla.data.format import load_meta
from sensorvla.data.normalize import compute_stats
from sensorvla.inference.runner import PolicyRunner
from sensorvla.models.policy import build_policy
from sensorvla.serving.protocol import ObservationError
from sensorvla.world.synth import generate_dataset


def streams_setup(root, vl_dir, seed: int, episodes: int, extra: tuple[str, ...], streams: tuple[str, ...]):
    """A synthetic dataset with the `extra` streams and a small-width config declaring `streams` on it (resolved
    from the dataset's meta, not yet validated): (dataset folder, config)."""
    data = generate_dataset(
        root / "ds", num_episodes=episodes, seed=seed, image_size=32, progress=False, extra_streams=extra
    )
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.sensor.hidden_dim = cfg.model.fusion.hidden_dim = cfg.model.head.hidden_dim = 32
    cfg.data.dataset_dir, cfg.data.sensor_samples = str(data), 8
    cfg.data.streams = streams
    return data, resolve_from_meta(cfg, load_meta(data))


@pytest.fixture(scope="module")
def streams_runner(tmp_path_factory, tiny_vl_dir):
    root = tmp_path_factory.mktemp("streams")
    streams = ("imu=imu,source=imu,samples=50,tokens=2", "tactile=taxel2d,source=tactile,window=0.2")
    data, cfg = streams_setup(root, tiny_vl_dir, 1, 3, ("tactile", "imu"), streams)
    cfg.validate()
    policy = build_policy(cfg).eval()
    policy.save_pretrained(root / "ckpt", cfg, compute_stats(data, progress=False, data_cfg=cfg.data, split="all"))
    ds = EpisodeDataset(data, cfg.data, split="all")
    return PolicyRunner.from_pretrained(root / "ckpt", generator_seed=0), ds


def robot_obs(ds, idx: int) -> dict:
    """What a robot sends at the sample's time: every stream's raw samples up to t (and some after, ignored)."""
    raw = ds[idx]
    e, t = raw["episode_index"], raw["timestamp"]
    obs = {"images": np.stack(raw["images"]), "state": raw["state"], "timestamp": t, "instruction": raw["instruction"]}
    for key, ts_key, source in [("sensor", "sensor_timestamps", "sensor")] + [
        (s.key, s.ts_key, s.source) for s in ds.streams
    ]:
        st = ds.source.sensor_stream(e, source)
        ts = st.timestamps + st.offset
        keep = (ts > t - 0.4) & (ts <= t)
        obs[key], obs[ts_key] = np.asarray(st.values[keep]), ts[keep]
    return raw, obs


def test_the_runner_keeps_a_history_per_stream_and_gives_the_training_path_actions(streams_runner):
    runner, ds = streams_runner
    assert [(s.name, s.shape, s.rate_hz) for s in runner.streams] == [("imu", (6,), 1000.0), ("tactile", (4, 4), 100.0)]
    spec = runner.observation_spec
    assert spec["sensor.tactile"][0] == (None, 4, 4) and spec["sensor_timestamps.imu"][0] == (None,)
    raw, obs = robot_obs(ds, 25)
    assert raw["sensor.imu"].shape == (50, 6) and raw["sensor.tactile"].shape == (8, 4, 4)
    out = runner.infer(obs)
    assert out["sensor_history"]["streams"]["imu"]["buffered_samples"] > 0
    batch = runner.batch_from_raw(raw, True)
    assert batch["sensor.tactile"].shape == (1, 8, 4, 4) and batch["sensor_mask.imu"].shape == (1, 50)
    import torch

    ref = runner.policy.predict_chunk(batch, generator=torch.Generator().manual_seed(0))[0].numpy()
    np.testing.assert_allclose(out["actions"], runner.normalizer.unnormalize("actions", ref), atol=1e-5)
    runner.reset()
    without = runner.infer({k: v for k, v in obs.items() if not k.endswith(("imu", "tactile"))})
    assert not np.allclose(without["actions"], out["actions"])  # the streams matter; leaving them out is allowed
    runner.reset()
    with pytest.raises(ObservationError, match=r"'sensor.tactile' must have shape \(N, 4, 4\)"):
        runner.infer(dict(obs, **{"sensor.tactile": obs["sensor.tactile"].reshape(-1, 2, 8)}))


def test_the_client_streams_each_by_name():
    from sensorvla.serving.client import PolicyClient

    client = PolicyClient("127.0.0.1", 1)
    client.stream_sensor([0.001, 0.002], np.ones((2, 6)), name="imu")
    client.stream_sensor([0.01], np.ones((1, 4, 4)), name="tactile")
    client.stream_sensor([0.0015], np.ones((1, 33)))  # unnamed: the legacy `sensor` field
    with pytest.raises(ValueError, match="not newer"):
        client.stream_sensor([0.002], np.ones((1, 6)), name="imu")
    obs, taken = client._with_stream({"instruction": "x"})
    assert obs["sensor.imu"].shape == (2, 6) and list(obs["sensor_timestamps.tactile"]) == [0.01]
    assert obs["sensor"].shape == (1, 33) and taken == {"sensor.imu": 1, "sensor.tactile": 1, "sensor": 1}
    client._drop_pending(taken)
    obs, _ = client._with_stream({})  # nothing new: zero rows of each stream (the server's history is used)
    assert obs["sensor.tactile"].shape == (0, 4, 4) and client.pending_sensor_samples == 0


def test_offline_eval_ablates_each_stream(streams_runner, tmp_path):
    from sensorvla.eval.offline import evaluate

    runner, ds = streams_runner
    metrics = evaluate("unused", ds.root, split="all", out_dir=tmp_path, max_samples=16, progress=False, runner=runner)
    assert set(metrics["stream_ablation"]) == {"imu", "tactile"}
    assert all(np.isfinite(v["delta_l1"]) and v["delta_l1"] != 0 for v in metrics["stream_ablation"].values())


def test_the_exported_tick_reads_every_stream(streams_runner):
    """`torch.export` of the runner's tick (the compiled inference path) with the declared streams equals eager."""
    import torch
    from torch.export import export

    from sensorvla.inference.tick import dynamic_shapes, starting_noise

    runner, ds = streams_runner
    runner.reset()
    _, obs = robot_obs(ds, 25)
    runner.infer(obs)
    _, vl_mask, v_proj, v_mem = runner._vl_projected
    b = runner.batch_from_raw(runner.session.raw_sample(runner.check_request(obs))[0], False)
    sensors = {k: v for k, v in b.items() if k.startswith(("sensor", "has_sensor"))}
    assert {"sensor.imu", "sensor_mask.tactile"} <= set(sensors)
    inputs = (sensors, b["state"], v_proj, vl_mask, tuple(v_mem), starting_noise(runner.policy, v_proj, None))
    with torch.no_grad():
        graph = export(runner.tick, inputs, dynamic_shapes=dynamic_shapes(inputs)).module()
        torch.testing.assert_close(graph(*inputs), runner.tick(*inputs), atol=1e-5, rtol=1e-5)
        blind = dict(sensors, **{"sensor_mask.imu": torch.zeros_like(sensors["sensor_mask.imu"])})
        torch.testing.assert_close(graph(blind, *inputs[1:]), runner.tick(blind, *inputs[1:]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(runner.tick(blind, *inputs[1:]), runner.tick(*inputs))


def test_a_sample_with_only_a_declared_stream_counts_as_with_sensor(streams_runner):
    """The `--sensor-loss-weight` weight: a sample is "with sensor" when any stream, declared or legacy, has a valid
    sample in its window (the dataset's raw sample, the runner's, and the transformed batch training weighs)."""
    from sensorvla.training.loop import window_weight_sum

    runner, ds = streams_runner
    raw = ds[25]
    only_streams = dict(raw, sensor=raw["sensor"] * 0, sensor_mask=raw["sensor_mask"] & False)
    assert only_streams["sensor_mask.imu"].any()
    # what the dataset reads for an episode recorded without the legacy sensor: has_sensor from the streams
    assert ds[25]["has_sensor"] and runner.sample_from_window(
        {}, raw["images"], only_streams["sensor"], only_streams["sensor_mask"],
        {"imu": (raw["sensor.imu"], raw["sensor_mask.imu"])},
    )["has_sensor"]  # fmt: skip
    batch = runner.batch_from_raw(only_streams, True)
    assert bool(batch["has_sensor"][0])
    assert window_weight_sum([batch], 3.0) == 3.0
    none = {k: (v & False if k.startswith("sensor_mask") else v) for k, v in only_streams.items()}
    assert not bool(runner.batch_from_raw(none, True)["has_sensor"][0])
    assert window_weight_sum([runner.batch_from_raw(none, True)], 3.0) == 1.0


def test_rollout_cli_rows_per_declared_stream(streams_runner):
    """`--ablate-stream imu,tactile` (or repeated): one rollout row per declared stream, each ablating it alone."""
    from sensorvla.cli.eval import stream_ablation_rows
    from sensorvla.config import ConfigError

    runner, _ = streams_runner
    rows = stream_ablation_rows(runner, ("imu,tactile", "imu"))
    assert rows == {"imu_ablated": {"ablate_sensor": "imu"}, "tactile_ablated": {"ablate_sensor": "tactile"}}
    with pytest.raises(ConfigError, match=r"its streams are \['sensor', 'imu', 'tactile'\]"):
        stream_ablation_rows(runner, ("force",))


def test_a_checkpoint_with_streams_but_no_sensor_tensor_lists_only_them_and_serves(tmp_path, tiny_vl_dir):
    """A policy that reads declared streams only (no legacy sensor tensor): its observation spec lists only what
    it takes (no `sensor` of 0 channels), and it serves: a client streams the IMU by name and gets actions."""
    from sensorvla.serving.client import PolicyClient
    from sensorvla.serving.server import PolicyServer

    data, cfg = streams_setup(tmp_path, tiny_vl_dir, 2, 2, ("imu",), ("imu=imu,source=imu,samples=20,tokens=2",))
    cfg.model.sensor.channels = cfg.model.sensor.force_channels = 0  # the policy takes the IMU stream only
    cfg.validate()
    policy = build_policy(cfg).eval()
    policy.save_pretrained(tmp_path / "ckpt", cfg, compute_stats(data, progress=False, data_cfg=cfg.data, split="all"))
    runner = PolicyRunner.from_pretrained(tmp_path / "ckpt", generator_seed=0)
    spec = runner.observation_spec
    assert "sensor" not in spec and "sensor_timestamps" not in spec
    assert spec["sensor.imu"][0] == (None, 6) and spec["sensor_timestamps.imu"][0] == (None,)
    ds = EpisodeDataset(data, cfg.data, split="all")
    _, obs = robot_obs(ds, 10)
    obs = {k: v for k, v in obs.items() if not k.startswith(("sensor", "sensor_timestamps")) or ".imu" in k}
    local = runner.infer(obs)["actions"]
    runner.reset()
    with PolicyServer(runner).start() as server, PolicyClient(port=server.port, timeout=120) as client:
        client.stream_sensor(obs["sensor_timestamps.imu"], obs["sensor.imu"], name="imu")
        served = client.infer({k: v for k, v in obs.items() if not k.startswith("sensor")})["actions"]
    np.testing.assert_allclose(served, local, atol=1e-5)
    runner.reset()
    assert not np.allclose(runner.infer({k: v for k, v in obs.items() if ".imu" not in k})["actions"], local)


def test_each_stream_has_its_own_normalization_and_transform_in_training_and_serving(tmp_path, tiny_vl_dir):
    """`normalization=` / `transform=` in a stream's line: saved with the config, fitted into the stats (the log
    scale), and applied by the one Normalizer the training path and the runner both build."""
    from sensorvla.data.normalize import NormalizationError, Normalizer, signed_log1p
    from sensorvla.data.transforms import normalize_sample
    from sensorvla.streams import StreamSpecError, parse_stream
    from sensorvla.training.data_setup import build_normalizer

    line = "imu=imu,source=imu,samples=20,tokens=2,normalization=quantile,transform=signed_log1p"
    assert parse_stream(line).to_text() == line and parse_stream(line).normalization == "quantile"
    with pytest.raises(StreamSpecError, match="choose normalization from"):
        parse_stream("imu=imu,source=imu,normalization=minmax")
    with pytest.raises(StreamSpecError, match="--data.sensor-transform"):
        parse_stream("ft=wrench,channels=0:6,transform=signed_log1p")  # the sensor tensor's own flags
    streams = (line, "tactile=taxel2d,source=tactile,normalization=none")
    data, cfg = streams_setup(tmp_path, tiny_vl_dir, 3, 2, ("imu", "tactile"), streams)
    cfg.validate()
    stats = compute_stats(data, progress=False, data_cfg=cfg.data, split="all")
    s = stats.stats["sensor.imu"]
    assert "log_scale" in s and "log_scale" not in stats.stats["sensor.tactile"]
    build_policy(cfg).eval().save_pretrained(tmp_path / "ckpt", cfg, stats)
    runner = PolicyRunner.from_pretrained(tmp_path / "ckpt", generator_seed=0)
    assert runner.cfg.data.streams[0].endswith("normalization=quantile,transform=signed_log1p")
    raw = EpisodeDataset(data, cfg.data, split="all")[10]
    m = raw["sensor_mask.imu"]
    want = (signed_log1p(raw["sensor.imu"][m], s["log_scale"]) - (s["q99"] + s["q01"]) / 2) / (
        (s["q99"] - s["q01"]) / 2
    )
    served = {k: v[0] for k, v in runner.batch_from_raw(raw, False).items()}
    trained = normalize_sample(raw, build_normalizer(stats, cfg), cfg.model.state_dim)  # the training path's
    for sample in (served, trained):  # one transform chain
        np.testing.assert_allclose(sample["sensor.imu"][m].numpy(), want, rtol=1e-4, atol=1e-5)
        mt = raw["sensor_mask.tactile"]
        np.testing.assert_allclose(sample["sensor.tactile"][mt].numpy(), raw["sensor.tactile"][mt], rtol=1e-6)
    with pytest.raises(NormalizationError, match="computed without it"):  # stats of another declaration
        Normalizer(compute_stats(data, progress=False, split="all"), streams=cfg.data.streams)
