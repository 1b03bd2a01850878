"""The closed-loop insertion env (Gymnasium API, success/failure rules, the sensor matters) and `rollout`
(chunked re-querying, success/length reporting, the ablated sensor reaching the policy as missing, GIFs)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

from sensorvla.config import SensorVLAConfig
from sensorvla.data.video import probe
from sensorvla.eval.rollout import expert_rollout, rollout
from sensorvla.inference.runner import PolicyRunner
from sensorvla.training.loop import train
from sensorvla.world.envs import register_envs
from sensorvla.world.envs.insertion import InsertionEnv
from sensorvla.world.synth import SimConfig

ENV_ID = "sensorvla/Insertion-v0"


@pytest.fixture(scope="module")
def runner(tmp_path_factory, tiny_vl_dir, synth_dataset_dir):
    out = tmp_path_factory.mktemp("trained_rollout")
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.data.dataset_dir = str(synth_dataset_dir)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps = 16, 1, 2
    cfg.train.tensorboard = False
    train(cfg, progress=False)
    return PolicyRunner.from_pretrained(out / "checkpoints" / "pretrained_model")


class SpyRunner:
    """Wraps a runner; records, per query, whether the observation reaches the model with sensor data."""

    def __init__(self, runner):
        self.runner, self.has_sensor, self.resets = runner, [], 0

    def infer(self, obs):
        self.has_sensor.append(self.runner.raw_sample(obs)["has_sensor"])
        return self.runner.infer(obs)

    def reset(self):
        self.resets += 1
        self.runner.reset()


def test_register_is_explicit_and_idempotent():
    register_envs()
    register_envs()
    env = gym.make(ENV_ID)
    assert isinstance(env.unwrapped, InsertionEnv)


def test_env_passes_gymnasium_checks_and_is_seeded():
    from gymnasium.utils.env_checker import check_env

    env = InsertionEnv(SimConfig(image_size=64))
    with pytest.warns(UserWarning):  # only advisory warnings (unbounded boxes, physical action units)
        check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert obs["images"].shape == (2, 64, 64, 3) and obs["images"].dtype == np.uint8
    assert obs["sensor"].shape == (env.n_sensor, 33) and obs["sensor"].dtype == np.float32
    assert np.all(obs["sensor_timestamps"] <= obs["timestamp"]) and np.all(np.diff(obs["sensor_timestamps"]) > 0)
    again, _ = InsertionEnv(SimConfig(image_size=64)).reset(seed=3)
    np.testing.assert_array_equal(obs["images"], again["images"])
    np.testing.assert_array_equal(obs["state"], again["state"])
    frame = env.render()
    assert frame.shape == (64, 128, 3) and frame.dtype == np.uint8
    obs2, reward, terminated, truncated, info = env.step(np.zeros(7, np.float32))
    assert obs2["timestamp"] == pytest.approx(0.1) and reward == 0.0 and not terminated and not truncated
    assert obs2["sensor_timestamps"][-1] > obs["sensor_timestamps"][-1]  # fresh samples every step
    assert {"success", "layer_distance_mm", "lateral_error_mm"} <= set(info)


def test_overshoot_fails_and_timeout_truncates():
    env = InsertionEnv()
    env.reset(seed=0)
    down = np.array([0, 0, -2, 0, 0, 0, 1], np.float32)
    for _ in range(50):
        _, reward, terminated, truncated, info = env.step(down)
        if terminated or truncated:
            break
    assert terminated and not truncated and not info["success"] and reward == 0.0
    assert info["layer_distance_mm"] < -env.cfg.overshoot_fail_mm
    env.reset(seed=0)
    env.unwrapped.cfg.max_steps = 5
    results = [env.step(np.zeros(7, np.float32)) for _ in range(5)]
    assert [r[3] for r in results] == [False] * 4 + [True] and not any(r[2] for r in results)


def test_expert_succeeds_and_a_sensor_blind_expert_fails_more():
    env = InsertionEnv()
    expert = expert_rollout(env, episodes=12, seed=0)
    blind = expert_rollout(env, episodes=12, seed=0, blind=True)  # assumes the mean layer depth
    assert expert["success_rate"] >= 0.9
    assert blind["success_rate"] <= expert["success_rate"] - 0.4


def test_sensor_unavailable_env_reaches_the_runner_as_missing(runner):
    obs, _ = InsertionEnv(sensor_available=False).reset(seed=0)
    assert not runner.raw_sample(obs)["has_sensor"]
    obs, _ = InsertionEnv().reset(seed=0)
    assert runner.raw_sample(obs)["has_sensor"]


def test_rollout_reports_success_length_and_writes_a_video(runner, tmp_path):
    env = InsertionEnv()
    env.cfg.max_steps = 10
    spy = SpyRunner(runner)
    r = rollout(spy, env, episodes=2, execute_steps=3, video_dir=tmp_path, videos="first", seed=0)
    lengths = [e["length"] for e in r["results"]]
    assert r["episodes"] == 2 and spy.resets == 2 and all(1 <= n <= 10 for n in lengths)
    assert r["success_rate"] == np.mean([e["success"] for e in r["results"]])
    assert r["mean_episode_length"] == pytest.approx(np.mean(lengths))
    assert len(spy.has_sensor) == sum(math.ceil(n / 3) for n in lengths)  # re-query every 3 steps
    assert all(spy.has_sensor)
    outcome = "success" if r["results"][0]["success"] else "failure"
    video = tmp_path / f"episode_00_sensor_{outcome}.mp4"
    assert r["videos"] == [{"episode": 0, "success": r["results"][0]["success"], "path": str(video)}]
    assert probe(video).frames == lengths[0] + 1  # the reset frame plus one per step
    assert [p.name for p in tmp_path.iterdir()] == [video.name]  # videos="first"

    spy.has_sensor.clear()
    blind = rollout(spy, env, episodes=2, execute_steps=8, ablate_sensor=True, seed=0)
    assert blind["sensor_ablated"] and len(blind["results"]) == 2
    assert spy.has_sensor and not any(spy.has_sensor)  # the policy saw the sensor as missing
    assert blind["success_rate"] == np.mean([e["success"] for e in blind["results"]])
    assert blind["lateral_ok_rate"] == np.mean([e["lateral_ok"] for e in blind["results"]])


def test_expert_needs_the_cameras_and_the_sensor():
    """The built-in task: a vision-blind expert misses the target, a sensor-blind one misses the layer."""
    env = InsertionEnv()
    full = expert_rollout(env, episodes=20, seed=0)
    no_sensor = expert_rollout(env, episodes=20, seed=0, blind=True)
    no_vision = expert_rollout(env, episodes=20, seed=0, vision_blind=True)
    assert full["success_rate"] == 1.0 and full["lateral_ok_rate"] == 1.0
    assert no_sensor["success_rate"] <= 0.4 and no_sensor["lateral_ok_rate"] == 1.0  # aligned, wrong depth
    assert no_vision["success_rate"] <= 0.15 and no_vision["lateral_ok_rate"] <= 0.15
    assert no_vision["mean_final_lateral_error_mm"] > 5 * env.cfg.lateral_tol_mm / 2
    assert no_sensor["mean_final_depth_error_mm"] > 5 * full["mean_final_depth_error_mm"]


def test_contact_variant_scores_only_the_depth():
    register_envs()
    env = gym.make("sensorvla/InsertionContact-v0")
    assert env.unwrapped.cfg.task == "contact"
    no_vision = expert_rollout(env, episodes=10, seed=0, vision_blind=True)
    assert no_vision["success_rate"] == 1.0 and no_vision["lateral_ok_rate"] <= 0.2


def test_target_is_visible_only_in_the_cameras_and_the_layer_only_to_the_sensor():
    from sensorvla.world.synth import InsertionSim

    a, b = InsertionSim(0), InsertionSim(0)
    b.target = a.target + 3.0  # another target: the images differ, the sensor does not
    b.depth = a.depth
    assert not np.array_equal(a.render("top"), b.render("top"))
    assert not np.array_equal(a.render("front"), b.render("front"))
    z = np.linspace(-3, 5, 20)
    np.testing.assert_array_equal(a.sensor_values(z), b.sensor_values(z))
    c = InsertionSim(0)
    c.depth = a.depth + 1.0  # another layer depth: the sensor differs, the images do not
    for view in ("top", "front"):
        np.testing.assert_array_equal(a.render(view), c.render(view))
    assert not np.allclose(a.sensor_values(z), c.sensor_values(z))
    assert "target" not in str(a.pose)  # the state is the pose only: [x, y, z, roll, pitch, yaw]
    assert a.pose.shape == (6,)


class ImageSpy(SpyRunner):
    def __init__(self, runner):
        super().__init__(runner)
        self.images = []

    def infer(self, obs):
        self.images.append(np.asarray(obs["images"]).copy())
        return super().infer(obs)


@pytest.mark.parametrize("mode", ["blank", "shuffled"])
def test_vision_ablation_reaches_the_policy(runner, mode):
    env = InsertionEnv()
    env.cfg.max_steps = 6
    spy = ImageSpy(runner)
    r = rollout(spy, env, episodes=2, execute_steps=3, ablate_vision=mode, seed=0)
    assert r["vision_ablated"] == mode and spy.images
    true_first = [env.reset(seed=s)[0]["images"] for s in (0, 1)]
    if mode == "blank":
        assert all(not im.any() for im in spy.images)
    else:
        # each episode sees one other scene, never its own
        assert not np.array_equal(spy.images[0], true_first[0]) and spy.images[0].any()
        assert np.array_equal(spy.images[0], spy.images[1])  # constant within the episode
    with pytest.raises(ValueError, match="ablate_vision"):
        rollout(spy, env, episodes=1, ablate_vision="dark")


def test_rollout_cli_ablates_a_named_stream_and_names_the_streams_on_a_wrong_one(runner, tmp_path):
    """`sensorvla rollout --ablate-stream sensor`: a row with that stream alone ablated (the policy sees it as
    missing, its video named after it); an unknown name is a ConfigError listing the checkpoint's streams."""
    from sensorvla.cli.eval import stream_ablation_rows
    from sensorvla.config import ConfigError

    assert stream_ablation_rows(runner, ("sensor",)) == {"sensor_ablated": {"ablate_sensor": "sensor"}}
    assert stream_ablation_rows(runner, ()) == {}
    with pytest.raises(ConfigError, match=r"--ablate-stream imu: .*its streams are \['sensor'\]"):
        stream_ablation_rows(runner, ("sensor,imu",))
    env = InsertionEnv()
    env.cfg.max_steps = 4
    spy = SpyRunner(runner)
    r = rollout(spy, env, episodes=1, execute_steps=4, ablate_sensor="sensor", video_dir=tmp_path, videos="all")
    assert spy.has_sensor and not any(spy.has_sensor) and r["sensor_ablated"] == "sensor"
    assert [p.name.startswith("episode_00_no_sensor_") for p in tmp_path.iterdir()] == [True]


def test_the_env_views_are_checked_against_the_policys(caplog):
    """Same names in another order: refused (each view would reach the policy as another); other names: a warning
    naming both; the same list or an env without names: nothing."""
    from types import SimpleNamespace

    from sensorvla.eval.rollout import check_view_names

    def env(names):
        return SimpleNamespace(unwrapped=SimpleNamespace(view_names=names))

    runner = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(views=("top", "wrist"))))
    with pytest.raises(ValueError, match=r"views are \['wrist', 'top'\] but the policy was trained on \['top', 'w"):
        check_view_names(env(("wrist", "top")), runner)
    with caplog.at_level("WARNING", logger="sensorvla.eval.rollout"):
        check_view_names(env(("front", "top")), runner)
    assert "['front', 'top'] are not the ones the policy was trained on ['top', 'wrist']" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sensorvla.eval.rollout"):
        check_view_names(env(("top", "wrist")), runner)
        check_view_names(env(None), runner)
        check_view_names(env(("a", "b")), SimpleNamespace(data_cfg=SimpleNamespace(views=("a", "b"))))
    assert not caplog.text


def test_rollout_table_one_renderer_for_rollout_and_the_demo():
    """`sensorvla rollout` and the demo print the same table: rows in the labels' order and words, absent rows
    skipped, a quantity the env does not report as "–"."""
    from sensorvla.demo import format_table
    from sensorvla.eval.rollout import rollout_table

    rows = {
        "sensor_ablated": {"success_rate": 0.25, "lateral_ok_rate": None, "mean_final_lateral_error_mm": 1.234},
        "all": {"success_rate": 1.0, "lateral_ok_rate": 0.9, "mean_final_depth_error_mm": 0.5, "episodes": 4},
    }
    plain = rollout_table(rows).splitlines()
    assert plain[2:] == [
        "| sensor ablated | 25 % | – | 1.23 | – |",
        "| all | 100 % | 90 % | – | 0.50 |",
    ]
    demo = format_table("regression", rows).splitlines()
    assert demo[0].endswith("4 seeded episodes per row") and demo[2:4] == plain[:2]
    assert demo[4:] == [
        "| ours, all modalities | 100 % | 90 % | – | 0.50 |",
        "| ours, sensor ablated | 25 % | – | 1.23 | – |",
    ]
