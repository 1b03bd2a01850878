"""Issue 9 item 5: sensor transforms before normalization (signed_log1p with a scale, a clip to quantiles),
chosen in config, saved with the stats, applied identically in training and inference."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from sensorvla.config import DataConfig
from sensorvla.data.format import write_dataset
from sensorvla.data.normalize import NormalizationError, Normalizer, NormStats, compute_stats, signed_log1p
from sensorvla.data.types import EpisodeData, ImageStream


def heavy_tailed_episode(k: int, rng) -> EpisodeData:
    """A force channel that idles at a few N and spikes to thousands of N on contact, and 3 A-scan bins."""
    n_a, rate = 30, 500.0
    a_t = np.arange(n_a) * 0.1
    s_t = np.arange(0, 3.0, 1 / rate)
    force = np.abs(rng.normal(0, 2.0, len(s_t)))
    contacts = rng.choice(len(s_t), size=25, replace=False)
    for c in contacts:
        force[c : c + 20] += rng.lognormal(7.0, 0.8)  # ~1100 N median spike, up to several thousand
    ascan = rng.normal(0.5, 0.1, (len(s_t), 3))
    frames = np.full((n_a, 16, 16, 3), 100, np.uint8)
    return EpisodeData(
        name=f"heavy_{k}",
        instruction="press until contact",
        action_timestamps=a_t,
        actions=rng.normal(size=(n_a, 7)).astype(np.float32),
        state_timestamps=a_t,
        state=rng.normal(size=(n_a, 6)).astype(np.float32),
        images={"cam": ImageStream(a_t, frames)},
        sensor_timestamps=s_t,
        sensor=np.concatenate([force[:, None], ascan], axis=1).astype(np.float32),
    )


@pytest.fixture(scope="module")
def heavy_ds(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_dataset(
        [heavy_tailed_episode(k, rng) for k in range(6)],
        tmp_path_factory.mktemp("heavy") / "ds",
        dataset_id="heavy",
        action_fps=10,
        progress=False,
        extra_info={"force_channels": 1, "sensor_rate": 500.0},
    )


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(dataset_dir=str(root), **kw)


def raw_force(root, cfg) -> np.ndarray:
    from sensorvla.data.source import open_source

    src = open_source(root)
    return np.concatenate([np.asarray(src.load(e).sensor) for e in range(len(src))])


def test_signed_log1p_tames_heavy_tailed_force(heavy_ds):
    x = raw_force(heavy_ds, None)
    assert x[:, 0].max() > 1000 and np.median(x[:, 0]) < 5  # the motivating case
    plain = Normalizer(compute_stats(heavy_ds, progress=False, data_cfg=cfg_for(heavy_ds)))
    logged = Normalizer(
        compute_stats(heavy_ds, progress=False, data_cfg=cfg_for(heavy_ds, sensor_transform="signed_log1p"))
    )
    zp, zl = plain.normalize("sensor", x)[:, 0], logged.normalize("sensor", x)[:, 0]
    idle = x[:, 0] < np.quantile(x[:, 0], 0.5)
    # without the transform, contact spikes sit far out and every idle reading collapses onto one value
    assert np.abs(zp).max() > 8 and zp[idle].std() < 0.01
    # with it, nothing is far out and the idle readings stay distinguishable
    assert np.abs(zl).max() < 4 and zl[idle].std() > 5 * zp[idle].std()
    # channels=force leaves the A-scan channels exactly as plain normalization has them
    np.testing.assert_allclose(logged.normalize("sensor", x)[:, 1:], plain.normalize("sensor", x)[:, 1:], rtol=1e-5)
    # the scale: default per channel, the median |x| of the training split; or a fixed one in physical units
    tf = logged.stats.sensor_transform
    assert tf.log_mask.tolist() == [True, False, False, False] and 0.5 < tf.log_scale[0] < 5
    fixed = compute_stats(
        heavy_ds, progress=False, data_cfg=cfg_for(heavy_ds, sensor_transform="signed_log1p", sensor_log_scale=10.0)
    )
    assert fixed.sensor_transform.log_scale[0] == 10.0
    np.testing.assert_allclose(signed_log1p(np.array([-10.0, 0.0, 10.0]), 10.0), np.log1p([1, 0, 1]) * [-1, 1, 1])


def test_clip_to_quantiles(heavy_ds):
    x = raw_force(heavy_ds, None)
    cfg = cfg_for(heavy_ds, sensor_clip_quantile=0.01)
    st = compute_stats(heavy_ds, progress=False, data_cfg=cfg)
    tf = st.sensor_transform
    assert tf.log_mask is None and tf.lo is not None
    z = Normalizer(st).normalize("sensor", x)
    # every value beyond the training quantile maps onto the bound
    bound = (tf.hi[0] - st.stats["sensor"]["mean"][0]) / st.stats["sensor"]["std"][0]
    assert np.isclose(z[:, 0].max(), bound, rtol=1e-5) and (x[:, 0] > tf.hi[0]).sum() > 10
    # the stats describe the clipped values
    assert st.stats["sensor"]["max"][0] == pytest.approx(tf.hi[0], rel=1e-6)


def test_transform_is_saved_with_the_stats_and_reapplied(heavy_ds, tmp_path):
    cfg = cfg_for(
        heavy_ds, sensor_transform="signed_log1p", sensor_transform_channels="all", sensor_clip_quantile=0.005
    )
    st = compute_stats(heavy_ds, progress=False, data_cfg=cfg)
    st.save(tmp_path / "norm_stats.json")
    loaded = NormStats.load(tmp_path / "norm_stats.json")
    assert loaded.sensor_transform.spec == st.sensor_transform.spec
    x = raw_force(heavy_ds, None)[:500]
    a, b = Normalizer(st).normalize("sensor", x), Normalizer(loaded).normalize("sensor", x)
    np.testing.assert_array_equal(a, b)
    t = Normalizer(loaded).normalize("sensor", torch.from_numpy(x))  # torch (the runner's path) == numpy
    np.testing.assert_allclose(t.numpy(), a, rtol=1e-5, atol=1e-5)
    assert loaded.sensor_transform.log_mask.all()


def test_config_and_saved_stats_must_agree(heavy_ds, tmp_path):
    from sensorvla.config import SensorVLAConfig
    from sensorvla.data.normalize import compute_stats
    from sensorvla.training.data_setup import ensure_stats, stats_path
    from sensorvla.training.distributed import DistInfo

    root = shutil.copytree(heavy_ds, tmp_path / "ds")
    cfg = SensorVLAConfig()
    cfg.data = cfg_for(root)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    assert ensure_stats(cfg, info, progress=False).sensor_transform.identity  # computed with the config
    assert not stats_path(root).exists()  # into the user cache, never the dataset
    cfg.data = dataclasses.replace(cfg.data, sensor_transform="signed_log1p", sensor_log_scale=10.0)
    # the cached stats are keyed by the transform too: another transform gets its own
    assert ensure_stats(cfg, info, progress=False).sensor_transform.spec["transform"] == "signed_log1p"
    compute_stats(root, progress=False, data_cfg=cfg_for(root)).save(stats_path(root))  # `sensorvla stats`
    with pytest.raises(NormalizationError) as ei:  # the dataset's stats (the user's) are used, and must agree
        ensure_stats(cfg, info, progress=False)
    msg = str(ei.value)
    assert "sensorvla stats --dataset DIR --data.sensor-transform signed_log1p" in msg and "10.0" in msg
    stats_path(root).unlink()  # the other named fix: training recomputes them with the config
    assert ensure_stats(cfg, info, progress=False).sensor_transform.spec["transform"] == "signed_log1p"


def test_training_and_runner_apply_the_same_transform(tmp_path, tiny_vl_dir, heavy_ds):
    """Train 2 steps with a transform, load the checkpoint in PolicyRunner: its inputs equal training's."""
    from sensorvla.config import SensorVLAConfig
    from sensorvla.data.dataset import EpisodeDataset
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.models.processor import PolicyProcessor
    from sensorvla.training.data_setup import build_normalizer, ensure_stats
    from sensorvla.training.distributed import DistInfo
    from sensorvla.training.loop import train

    root = shutil.copytree(heavy_ds, tmp_path / "ds")
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.data = cfg_for(root, sensor_transform="signed_log1p", sensor_clip_quantile=0.001)
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps = 4, 1, 2
    cfg.train.tensorboard, cfg.train.use_cache = False, "never"
    train(cfg, progress=False)
    ckpt = next((tmp_path / "run" / "checkpoints").rglob("norm_stats.json")).parent
    runner = PolicyRunner.from_pretrained(ckpt)
    assert runner.normalizer.stats.sensor_transform.spec["transform"] == "signed_log1p"
    from sensorvla.config import resolve_from_meta

    tcfg = resolve_from_meta(cfg, EpisodeDataset(root, cfg.data, "all").meta)
    norm = build_normalizer(ensure_stats(tcfg, DistInfo(0, 1, 0, torch.device("cpu")), progress=False), tcfg)
    training = PolicyProcessor(norm, None, tcfg.model.backbone.prompt_template, tcfg.model.state_dim)
    ds = EpisodeDataset(root, runner.cfg.data, split="all")
    raw = next(ds[i] for i in range(len(ds)) if ds[i]["sensor"][:, 0].max() > 500)  # a contact window
    a, b = training(raw)["sensor"], runner.transform(raw)["sensor"]
    assert torch.equal(a, b) and a.abs().max() < 6
