"""Offline evaluation (metrics in physical units, sensor ablation, plots, report), the closed-loop env,
rollouts and the latency benchmark's structure."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from sensorvla.config import SensorVLAConfig
from sensorvla.eval.offline import evaluate
from sensorvla.eval.rollout import expert_rollout, rollout
from sensorvla.inference.runner import PolicyRunner
from sensorvla.training.loop import train
from sensorvla.world.envs import register_envs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vl_dir, synth_dataset_dir):
    out = tmp_path_factory.mktemp("trained")
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.data.dataset_dir = str(synth_dataset_dir)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps = 16, 1, 6
    cfg.train.tensorboard = False
    train(cfg, progress=False)
    return out / "checkpoints" / "pretrained_model"


def test_offline_eval_writes_metrics_plots_report(trained, synth_dataset_dir, tmp_path):
    m = evaluate(trained, synth_dataset_dir, split="test", out_dir=tmp_path, progress=False)
    for name in (
        "metrics.json",
        "report.md",
        "report.html",
        "trajectories.png",
        "error_per_step.png",
        "sensor_ablation.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["num_samples"] == m["num_samples"] > 0
    assert len(saved["l1_per_step"]) == 8 and len(saved["l1_per_dim"]) == 7
    assert set(saved["ablation"]) == {"missing", "shuffled"}
    assert "sensor_ablation_delta_l1_missing" in saved
    assert saved["with_sensor"]["num_samples"] + saved["without_sensor"]["num_samples"] == saved["num_samples"]


def test_offline_metrics_are_physical_units(trained, synth_dataset_dir, tmp_path):
    """Recompute the first-action error of two samples by hand through PolicyRunner.infer."""
    from sensorvla.data.dataset import EpisodeDataset

    runner = PolicyRunner.from_pretrained(trained)
    m = evaluate(
        trained, synth_dataset_dir, split="test", out_dir=tmp_path, max_samples=2, progress=False, runner=runner
    )
    ds = EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="test")
    errs = []
    for i in range(2):
        raw = ds[i]
        batch = runner.prepare(
            {
                "images": np.stack(raw["images"]),
                "state": raw["state"],
                "instruction": raw["instruction"],
                "timestamp": raw["timestamp"],
            }
        )
        batch.update(
            sensor=runner.transform(raw)["sensor"][None],
            sensor_mask=runner.transform(raw)["sensor_mask"][None],
            has_sensor=runner.transform(raw)["has_sensor"][None],
        )
        import torch

        pred = runner.policy.predict_chunk(batch, generator=torch.Generator().manual_seed(0)).numpy()[0]
        phys = runner.normalizer.unnormalize("actions", pred)
        errs.append(np.abs(phys[0] - raw["actions"][0]))
    assert m["first_action_l1"] == pytest.approx(float(np.mean(errs)), rel=1e-4)
    # the unit scale is physical: dz targets are O(0.1-1 mm), not unit-variance normalized values
    assert np.abs(ds[0]["actions"][:, 2]).max() < 2.0


def test_env_expert_needs_the_sensor():
    register_envs()
    from gymnasium.utils.env_checker import check_env

    env = gym.make("sensorvla/Insertion-v0")
    check_env(env.unwrapped, skip_render_check=True)
    expert = expert_rollout(env, episodes=10, seed=0)
    blind = expert_rollout(env, episodes=10, seed=0, blind=True)
    assert expert["success_rate"] >= 0.9
    assert blind["success_rate"] <= expert["success_rate"] - 0.4


def test_rollout_reports_success_and_writes_a_video(trained, tmp_path):
    register_envs()
    runner = PolicyRunner.from_pretrained(trained)
    env = gym.make("sensorvla/Insertion-v0", max_episode_steps=None)
    env.unwrapped.cfg.max_steps = 15
    r = rollout(runner, env, episodes=2, execute_steps=4, video_dir=tmp_path, videos="first")
    assert r["episodes"] == 2 and r["success_rate"] == np.mean([e["success"] for e in r["results"]])
    assert all(e["final_lateral_error_mm"] is not None and e["final_depth_error_mm"] is not None for e in r["results"])
    assert all(1 <= e["length"] <= 15 for e in r["results"])
    assert [Path(v["path"]).stat().st_size > 0 for v in r["videos"]] == [True]
    blind = rollout(runner, env, episodes=1, execute_steps=8, ablate_sensor=True)
    assert blind["sensor_ablated"] and blind["results"][0]["length"] <= 15


def test_rollout_command_writes_videos_and_a_report_linking_them(trained, tmp_path, capsys):
    """`sensorvla rollout --videos some`: the first success and the first failure with all inputs (here the
    untrained policy fails, so one), a report with the table and a link per video that exists."""
    import re

    from sensorvla.cli import main
    from sensorvla.data.video import probe

    args = ["rollout", "--checkpoint", str(trained), "--episodes", "2", "--no-ablate", "--out", str(tmp_path)]
    assert main(args) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| all |" in report and f"report: {tmp_path / 'report.md'}" in capsys.readouterr().out
    links = re.findall(r"\]\(([^)]+\.mp4)\)", report)
    saved = json.loads((tmp_path / "rollout.json").read_text())["all"]
    assert len(links) == len({r["success"] for r in saved["results"]}) == len(saved["videos"])
    for name in links:
        assert probe(tmp_path / name).frames >= 2
    assert main([*args[:-2], "--out", str(tmp_path / "none"), "--videos", "none"]) == 0
    assert not list((tmp_path / "none").glob("*.mp4"))


def test_rollout_command_replans_every_step_with_counted_vl_refreshes(trained, tmp_path, monkeypatch):
    """`sensorvla rollout` re-plans at every control step by default, and `--vl-refresh-every K` builds a fast-slow
    runner whose VL refreshes are counted in queries, never aged out by the wall clock."""
    from sensorvla.cli import main
    from sensorvla.inference.runner import PolicyRunner

    seen, real = {}, PolicyRunner.from_pretrained.__func__

    def spy(cls, path, **kw):
        seen.update(kw)
        return real(cls, path, **kw)

    monkeypatch.setattr(PolicyRunner, "from_pretrained", classmethod(spy))
    args = ["rollout", "--checkpoint", str(trained), "--episodes", "1", "--no-ablate", "--videos", "none"]
    assert main([*args, "--out", str(tmp_path), "--vl-refresh-every", "3"]) == 0
    assert seen == {"vl_refresh_every": 3, "max_vl_age_s": float("inf")}
    assert json.loads((tmp_path / "rollout.json").read_text())["all"]["execute_steps"] == 1


def test_latency_benchmark_structure(tiny_vl_dir):
    from sensorvla.eval.latency import bench_latency, format_table, ratios

    rows = bench_latency(tiny_vl_dir, heads=("regression", "diffusion"), views=(1, 2), iters=2, warmup=1, image_size=56)
    assert len(rows) == 8
    assert set(ratios(rows)) >= {"diffusion_over_regression", "full_over_fast_slow"}
    assert "| regression | 1 | full |" in format_table(rows)
