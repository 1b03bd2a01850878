"""`sensorvla bench sim` (issue 18, item 2): the env's expert -> dataset -> our two stages -> closed loop, beside
the plain CNN with and without the sensor on the same CPU-seconds; the table, bench.json and report.md."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sensorvla.world.bench import CNN_ROWS, ROWS, BenchSettings, record_demos, run_bench


def tiny_settings(tiny_vl_dir, **kw) -> BenchSettings:
    """A few demos, one stage-1 epoch, two stage-2 steps, two episodes per row, the CNNs capped at 2 steps."""
    base = dict(task="insertion", demos=3, episodes=2, stage1_epochs=1, stage2_steps=2, cnn_max_steps=2,
                vl_model=str(tiny_vl_dir), image_size=56)  # fmt: skip
    return BenchSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, tiny_vl_dir):
    """The whole pipeline once on tiny settings, re-planning every step with the VL features refreshed every 3rd
    query: (out folder, settings, summary, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench")
    s = tiny_settings(tiny_vl_dir, execute_steps=1, vl_refresh_every=3)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run_bench(out, s)
    return out, s, summary, printed.getvalue()


def test_bench_sim_gives_the_table_and_the_same_cpu_budget(tiny_bench):
    """The whole pipeline on tiny settings: every row of the table, the JSON and report, and each CNN's CPU-seconds
    budget set to exactly what our cache + stage 1 + stage 2 measured (asserted on the settings, not on time)."""
    out, _, summary, printed = tiny_bench
    saved = json.loads((out / "bench.json").read_text())
    table = saved["closed_loop"]
    assert set(table) == {*ROWS, *CNN_ROWS, "expert"}
    assert all(table[row]["episodes"] == 2 for row in table)
    assert table["sensor_ablated"]["sensor_ablated"] and table["vision_ablated"]["vision_ablated"] == "blank"
    budget = saved["budget"]
    ours = budget["ours"]
    assert ours["cpu_s"] == pytest.approx(sum(saved["phases"]["cpu_s"][k] for k in ("cache", "stage1", "stage2")))
    assert ours["cpu_s"] > 0 and (ours["stage1_epochs"], ours["stage2_steps"]) == (1, 2)
    for row in CNN_ROWS:
        assert budget[row]["cpu_budget_s"] == ours["cpu_s"]  # the same CPU-seconds, recorded
        assert budget[row]["max_steps"] == 2  # the smoke cap, recorded beside it
    assert saved["training"]["stage1"]["epochs"] == 1 and saved["training"]["stage2"]["steps"] == 2
    assert saved["demos"] == {"dataset": str(out / "data"), "kept": 3, "recorder": "world.synth.generate_dataset"}
    assert summary["env_id"] == "sensorvla/Insertion-v0"
    report = (out / "report.md").read_text()
    for label in ("ours, all modalities", "ours, sensor ablated", "ours, vision ablated", "plain CNN, with the sensor",
                  "plain CNN, without the sensor", "CPU-seconds", "Where the time went"):  # fmt: skip
        assert label in report
    assert "| ours, all modalities |" in printed and "CPU-s budget" in printed
    assert "re-planned every control step, VL features refreshed every 3 queries" in printed


def test_every_policy_is_rolled_out_with_the_same_execution(tiny_bench):
    """Ours and both CNN references re-plan at the bench's `execute_steps` (here every control step): a CNN that
    ran open-loop chunks would be judged on another controller."""
    _, s, summary, _ = tiny_bench
    table = summary["closed_loop"]
    assert {table[row]["execute_steps"] for row in (*ROWS, *CNN_ROWS)} == {s.execute_steps} == {1}
    assert summary["settings"]["vl_refresh_every"] == 3


class CountingPolicy:
    """Wraps a runner: counts `infer` calls (queries) and episode resets."""

    def __init__(self, runner):
        self.runner, self.calls, self.resets = runner, 0, 0

    def infer(self, obs):
        self.calls += 1
        return self.runner.infer(obs)

    def reset(self):
        self.resets += 1
        self.runner.reset()


@pytest.mark.parametrize(("execute_steps", "refresh"), [(1, 3), (2, 1)])
def test_the_bench_policy_replans_at_sensor_rate_between_vl_refreshes(tiny_bench, execute_steps, refresh):
    """With execute_steps n the policy is queried every n control steps; the bench's runner then recomputes the VL
    features only every `vl_refresh_every` queries (counted, not timed) and re-runs the sensor encoder and head on
    the newest sensor window at every query."""
    import dataclasses

    from sensorvla.eval.rollout import rollout
    from sensorvla.world.bench import make_env, policy_runner

    _, s, summary, _ = tiny_bench
    s = dataclasses.replace(s, execute_steps=execute_steps, vl_refresh_every=refresh)
    runner = policy_runner(summary["training"]["checkpoint"], s)
    spy = CountingPolicy(runner)
    r = rollout(spy, make_env("sensorvla/Insertion-v0", s.image_size), episodes=1, execute_steps=execute_steps)
    steps = r["results"][0]["length"]
    assert spy.calls == -(-steps // execute_steps) and spy.resets == 1
    assert runner.vl_calls == -(-spy.calls // refresh)


def test_reuse_runs_the_closed_loop_on_the_trained_policy(tiny_bench, tmp_path):
    """--reuse: no demos and no training; our recorded CPU-seconds, dataset and checkpoint are taken over, the CNNs
    get that budget, the rows run with the new execution; a run trained with other settings is refused."""
    import dataclasses
    import shutil

    from sensorvla.config import ConfigError

    out, s, first, _ = tiny_bench
    shutil.copytree(out, tmp_path / "b", ignore=shutil.ignore_patterns("stage1", "stage2", "rollout"))
    again = run_bench(tmp_path / "b", dataclasses.replace(s, reuse=True, execute_steps=2, vl_refresh_every=1))
    assert not {"demos", "cache", "stage1", "stage2"} & set(again["phases"]["cpu_s"])
    assert again["budget"]["ours"]["cpu_s"] == first["budget"]["ours"]["cpu_s"] and again["budget"]["ours"]["reused"]
    assert again["budget"]["cnn_with_sensor"]["cpu_budget_s"] == first["budget"]["ours"]["cpu_s"]
    assert again["training"]["checkpoint"] == first["training"]["checkpoint"]
    assert {again["closed_loop"][row]["execute_steps"] for row in (*ROWS, *CNN_ROWS)} == {2}
    with pytest.raises(ConfigError, match="stage2_steps: 2 there, 3 now"):
        run_bench(tmp_path / "b", dataclasses.replace(s, reuse=True, stage2_steps=3))
    with pytest.raises(ConfigError, match="run `sensorvla bench sim` into .* once without --reuse"):
        run_bench(tmp_path / "empty", dataclasses.replace(s, reuse=True))


def test_execution_settings_below_one_are_refused():
    from sensorvla.config import ConfigError

    with pytest.raises(ConfigError, match="both must be >= 1"):
        BenchSettings(execute_steps=0)
    with pytest.raises(ConfigError, match="both must be >= 1"):
        BenchSettings(vl_refresh_every=0)


def test_a_fixed_cnn_budget_is_recorded_as_given(tmp_path, tiny_vl_dir):
    """--cnn-cpu-s B: both CNNs get B CPU-seconds (here with no CNN training past the step cap)."""
    from sensorvla.world.bench import Phases, train_cnns

    s = tiny_settings(tiny_vl_dir, cnn_cpu_s=123.0)
    data = record_demos("sensorvla/Insertion-v0", tmp_path / "data", 3, 56)
    from sensorvla.config import DataConfig
    from sensorvla.data.normalize import compute_stats
    from sensorvla.eval.cnn_baseline import dataset_normalizer
    from sensorvla.training.data_setup import stats_path

    dc = DataConfig(dataset_dir=data["dataset"], val_fraction=0.1, test_fraction=0.0)
    compute_stats(data["dataset"], data_cfg=dc).save(stats_path(data["dataset"]))
    phases = Phases()
    cnns = train_cnns(tmp_path / "data", dc, dataset_normalizer(tmp_path / "data", dc), s, s.cnn_cpu_s, phases)
    for row in CNN_ROWS:
        assert cnns[row][1]["config"]["cpu_budget_s"] == 123.0 and cnns[row][1]["steps"] == 2
    with_sensor, without = cnns["cnn_with_sensor"][0], cnns["cnn_without_sensor"][0]
    assert with_sensor.sensor is not None and without.sensor is None  # "without force" has no sensor input
    assert set(phases.cpu) == set(CNN_ROWS)


def test_recorded_demos_are_the_env_expert_with_its_sensor(tmp_path):
    """The expert's episodes become a dataset whose frames, actions and sensor rows are the env's (rows once each,
    strictly increasing, none after the episode's last frame)."""
    from sensorvla.config import DataConfig
    from sensorvla.data.dataset import EpisodeDataset
    from sensorvla.world.bench import make_env, record_episode

    env = make_env("sensorvla/Insertion-v0", 56)
    episode, ok = record_episode(env, 5, "e")
    assert ok and episode.actions.shape[1] == 7 and episode.images["front"].frames.shape[1:] == (56, 56, 3)
    assert np.all(np.diff(episode.sensor_timestamps) > 0)  # each sample once, in order
    assert episode.sensor_timestamps[-1] <= episode.action_timestamps[-1] + 1e-9  # causal: nothing from the future
    info = record_demos("sensorvla/Insertion-v0", tmp_path / "d", 2, 56)
    assert info["kept"] == 2 and info["expert_success_rate"] > 0
    ds = EpisodeDataset(tmp_path / "d", DataConfig(), split="all")
    assert ds.meta.views == ["front", "top"] and ds.meta.sensor_channels == 33 and len(ds.episodes) == 2


def test_unknown_task_names_the_choices(capsys):
    from sensorvla.cli.app import main

    assert main(["bench", "sim", "--task", "nope"]) == 1
    err = capsys.readouterr().err
    assert "--task 'nope' is not a registered env; choose one of" in err and "peg-in-hole" in err


def test_cnn_cpu_budget_ends_training(tmp_path):
    """A CPU-seconds budget alone ends the CNN's training once spent (so at least that much is used), reported;
    a config with no budget at all is refused."""
    from sensorvla.config import DataConfig
    from sensorvla.eval.cnn_baseline import CNNBaselineConfig, dataset_normalizer, train_cnn_baseline

    data = record_demos("sensorvla/Insertion-v0", tmp_path / "data", 2, 56)["dataset"]
    dc = DataConfig(dataset_dir=data, val_fraction=0.0, test_fraction=0.0)
    from sensorvla.data.normalize import compute_stats
    from sensorvla.training.data_setup import stats_path

    compute_stats(data, data_cfg=dc).save(stats_path(data))
    cfg = CNNBaselineConfig(budget_s=0.0, cpu_budget_s=0.5, batch_size=4, channels=8, hidden=32)
    _, info = train_cnn_baseline(data, dc, dataset_normalizer(data, dc), cfg, progress=False)
    assert info["cpu_s"] >= 0.5 and info["steps"] >= 1
    with pytest.raises(ValueError, match="set budget_s, cpu_budget_s or max_steps"):
        train_cnn_baseline(data, dc, None, CNNBaselineConfig(budget_s=0.0))


@pytest.mark.slow
def test_bench_sim_meets_the_issue_table_on_peg_in_hole(tmp_path):
    """Issue 18's row for tight peg-in-hole: all modalities >= 90 % and >= the CNN with the sensor; sensor ablated
    >= the CNN without the sensor (the sensor is not a crutch); vision ablated <= 20 %; our training CPU-seconds
    <= the CNN's."""
    import gymnasium as gym

    from sensorvla.world.envs import register_envs

    register_envs()
    if "sensorvla/PegInHole-v0" not in gym.registry:
        pytest.skip("sensorvla/PegInHole-v0 is not registered (the MuJoCo tasks: pip install sensorvla[sim])")
    s = run_bench(tmp_path, BenchSettings(task="peg-in-hole"))
    stage1 = json.loads((tmp_path / "stage1" / "train_config.json").read_text())
    assert stage1["model"]["backbone"]["keypoints"] == 16  # the small-data presets' keypoint tokens
    t, b = s["closed_loop"], s["budget"]
    assert t["all"]["episodes"] == 40
    assert t["all"]["success_rate"] >= 0.9 and t["all"]["success_rate"] >= t["cnn_with_sensor"]["success_rate"]
    assert t["sensor_ablated"]["success_rate"] >= t["cnn_without_sensor"]["success_rate"]
    assert t["vision_ablated"]["success_rate"] <= 0.2
    assert b["ours"]["cpu_s"] <= b["cnn_with_sensor"]["cpu_budget_s"]


@pytest.mark.slow
def test_bench_sim_meets_the_issue_table_on_blind_bottom(tmp_path):
    """Issue 18's row for blind-bottom insertion: all modalities >= 70 % and >= the CNN with the sensor; sensor
    ablated <= 20 %; vision ablated <= 20 %; our training CPU-seconds <= the CNN's."""
    import gymnasium as gym

    from sensorvla.world.envs import register_envs

    register_envs()
    if "sensorvla/BlindBottom-v0" not in gym.registry:
        pytest.skip("sensorvla/BlindBottom-v0 is not registered (the MuJoCo tasks: pip install sensorvla[sim])")
    s = run_bench(tmp_path, BenchSettings(task="blind-bottom"))
    t, b = s["closed_loop"], s["budget"]
    assert t["all"]["episodes"] == 40
    assert t["all"]["success_rate"] >= 0.7 and t["all"]["success_rate"] >= t["cnn_with_sensor"]["success_rate"]
    assert t["sensor_ablated"]["success_rate"] <= 0.2
    assert t["vision_ablated"]["success_rate"] <= 0.2
    assert b["ours"]["cpu_s"] <= b["cnn_with_sensor"]["cpu_budget_s"]


@pytest.mark.slow
def test_bench_sim_meets_the_issue_table_on_the_needle(tmp_path):
    """Issue 18's row for the layered needle: all modalities >= 90 %, sensor ablated <= 30 %, vision ablated <= 30 %,
    with the needle's own views (`top` and the carriage's `wrist` camera, which resolves the 1 mm lateral tolerance;
    with `front` + `top` the policy scored 3 of 40, lateral ok 8 %). The issue asks no CNN on this row."""
    import gymnasium as gym

    from sensorvla.world.envs import register_envs

    register_envs()
    if "sensorvla/Needle-v0" not in gym.registry:
        pytest.skip("sensorvla/Needle-v0 is not registered (the MuJoCo tasks: pip install sensorvla[sim])")
    s = run_bench(tmp_path, BenchSettings(task="needle", cnn=False))
    stage1 = json.loads((tmp_path / "stage1" / "train_config.json").read_text())
    assert stage1["data"]["views"] == ["top", "wrist"]
    t = s["closed_loop"]
    assert t["all"]["episodes"] == 40
    assert t["all"]["success_rate"] >= 0.9 and t["all"]["lateral_ok_rate"] >= 0.9
    assert t["sensor_ablated"]["success_rate"] <= 0.3
    assert t["vision_ablated"]["success_rate"] <= 0.3
