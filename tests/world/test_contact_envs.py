"""The MuJoCo contact benchmark (world/contact.py): determinism, the experts, offscreen rendering and the recorded
force stream. The full expert rates are slow-marked."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

from sensorvla.world.contact import TASKS, BlindBottomSim, NeedleSim, PegInHoleSim, import_mujoco
from sensorvla.world.contact_record import ENV_TASKS, expert_rollout, record_episode, task_of
from sensorvla.world.envs import register_envs

try:
    import_mujoco()  # sets MUJOCO_GL (offscreen) before mujoco's first import
except ImportError as e:
    pytest.skip(f"the contact benchmark needs MuJoCo: {e}", allow_module_level=True)

ENV_IDS = list(ENV_TASKS)


@pytest.fixture(scope="module")
def envs():
    register_envs()
    made = {env_id: gym.make(env_id) for env_id in ENV_IDS}
    yield made
    for env in made.values():
        env.close()


def run_steps(env, seed: int, steps: int) -> list[dict]:
    obs, _ = env.reset(seed=seed)
    out = [obs]
    sim = env.unwrapped.sim
    for _ in range(steps):
        obs, *_ = env.step(sim.expert_action())
        out.append(obs)
    return out


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_env_is_deterministic_by_seed(envs, env_id):
    first = run_steps(envs[env_id], seed=3, steps=6)
    register_envs()
    fresh = gym.make(env_id)  # a new model, renderer and RNG: the same episode
    again = run_steps(fresh, seed=3, steps=6)
    other = run_steps(fresh, seed=4, steps=0)
    fresh.close()
    for a, b in zip(first, again):
        for key in ("images", "state", "sensor", "sensor_timestamps", "timestamp"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a["instruction"] == b["instruction"]
    assert not np.array_equal(first[0]["images"], other[0]["images"])  # another seed, another scene


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_observation_matches_the_spaces_and_the_sensor_rate(envs, env_id):
    env = envs[env_id]
    obs = run_steps(env, seed=0, steps=2)[-1]
    assert env.observation_space.contains(obs)
    ts = obs["sensor_timestamps"]
    rate = env.unwrapped.cfg.sensor_rate
    assert rate >= 500
    np.testing.assert_allclose(np.diff(ts), 1 / rate, atol=1e-9)  # one reading per physics step
    assert ts[-1] == pytest.approx(float(obs["timestamp"]))  # causal and fresh: the newest reading is at t
    channels = 6 + 32 if env_id == "sensorvla/Needle-v0" else 6
    assert obs["sensor"].shape == (int(round(0.25 * rate)), channels)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_expert_succeeds_on_a_few_seeds(envs, env_id):
    r = expert_rollout(envs[env_id], episodes=3, seed=0)
    assert r["success_rate"] == 1.0, r["results"]
    blind = expert_rollout(envs[env_id], episodes=1, seed=0, vision=False)  # the target assumed at the centre
    assert blind["success_rate"] == 0.0


def test_blind_bottom_position_only_expert_fails(envs):
    env = envs["sensorvla/BlindBottom-v0"]
    r = expert_rollout(env, episodes=3, seed=0, mode="position")
    cfg = env.unwrapped.cfg
    assert r["success_rate"] == 0.0
    for e in r["results"]:  # it seats the peg, but presses too hard
        assert e["peak_force_n"] > cfg.peak_force_n or e["final_contact_force_n"] > cfg.final_force_n
    guarded = expert_rollout(env, episodes=3, seed=0)
    assert all(e["peak_force_n"] < cfg.peak_force_n for e in guarded["results"])


def test_rendering_is_offscreen_and_sized(envs):
    register_envs()
    env = gym.make("sensorvla/PegInHole-v0", image_size=32)
    obs, _ = env.reset(seed=0)
    env.close()
    assert obs["images"].shape == (2, 32, 32, 3)
    front, top = obs["images"]
    assert front.std() > 10 and top.std() > 10 and not np.array_equal(front, top)
    frame = envs["sensorvla/PegInHole-v0"].render()
    assert frame.shape == (64, 128, 3) and frame.dtype == np.uint8


def test_recorded_streams_are_what_the_env_saw_at_each_tick(tmp_path):
    """Causality: re-running the (unperturbed) expert, frame k equals the render at tick k and the recorded readings
    stamped at or before tick k are exactly those the sensor had produced by then."""
    from sensorvla.data.format import load_meta, write_dataset

    sim = PegInHoleSim()
    ep = record_episode(sim, 5, name="e0", lateral_noise_mm=0.0, depth_noise_mm=0.0, hold_steps=2)
    write_dataset(
        [ep],
        tmp_path / "d",
        dataset_id="t",
        action_fps=10.0,
        progress=False,
        image_format="npy",
        extra_info={"sensor_rate": 500.0, "force_channels": 6},
    )
    meta = load_meta(tmp_path / "d")
    s_ts, s_val = meta.streams["sensor"].timestamps(0), meta.streams["sensor"].values(0)
    frames = meta.streams["observation.images.top"].values(0)
    np.testing.assert_allclose(np.diff(s_ts), 0.002, atol=1e-9)
    assert meta.streams["sensor"].rate_hz == 500.0
    actions = meta.streams["action"].timestamps(0)
    sim.reset(5)
    for k, recorded in enumerate(ep.actions):
        t = k / 10.0
        a = sim.expert_action()
        np.testing.assert_allclose(recorded, a, atol=1e-5)
        assert actions[k] == pytest.approx(t)
        upto = s_ts <= t + 1e-9
        ts_now, vals_now = sim.sensor_samples(-np.inf, sim.t)
        np.testing.assert_array_equal(s_ts[upto], ts_now)
        np.testing.assert_array_equal(s_val[upto], vals_now)
        np.testing.assert_array_equal(frames[k], sim.render("top"))
        sim.step(a)
    sim.close()


def test_cli_writes_the_needle_dataset_with_its_ascan(tmp_path):
    from sensorvla.cli.app import main

    out = tmp_path / "needle"
    args = ["data", "synth", "--env", "sensorvla/Needle-v0", "--episodes", "1", "--image-format", "npy"]
    assert main([*args, "--out", str(out)]) == 0
    info = json.loads((out / "meta" / "info.json").read_text())["sensorvla"]
    assert info["sensor_rate"] == 500.0 and info["force_channels"] == 6 and info["sensor_channels"] == 38
    assert info["sensor_names"][:3] == ["fx_n", "fy_n", "fz_n"] and info["sensor_names"][6] == "ascan_0"


def test_bad_names_are_refused(envs):
    from sensorvla.world.envs.contact import ContactEnv

    with pytest.raises(ValueError, match="unknown contact task"):
        ContactEnv(task="peg")
    with pytest.raises(ValueError, match="not a contact task"):
        task_of("sensorvla/Insertion-v0")
    with pytest.raises(ValueError, match="expert mode"):
        expert_rollout(envs["sensorvla/PegInHole-v0"], episodes=1, mode="position")
    assert set(TASKS) == set(ENV_TASKS.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env_id", "mode", "vision", "lo", "hi"),
    [
        ("sensorvla/PegInHole-v0", "expert", True, 0.9, 1.0),
        ("sensorvla/PegInHole-v0", "expert", False, 0.0, 0.3),
        ("sensorvla/BlindBottom-v0", "guarded", True, 0.7, 1.0),
        ("sensorvla/BlindBottom-v0", "position", True, 0.0, 0.05),
        ("sensorvla/Needle-v0", "expert", True, 0.9, 1.0),
        ("sensorvla/Needle-v0", "sensor_blind", True, 0.0, 0.5),
        ("sensorvla/Needle-v0", "expert", False, 0.0, 0.3),
    ],
)
def test_expert_rates_over_40_seeds(envs, env_id, mode, vision, lo, hi):
    r = expert_rollout(envs[env_id], episodes=40, seed=1000, mode=mode, vision=vision)
    assert lo <= r["success_rate"] <= hi, r["success_rate"]


def test_needle_membranes_are_felt(envs):
    """The force rises on each membrane and drops at its puncture; the A-scan shows the next membrane ahead."""
    sim = NeedleSim()
    sim.reset(2)
    while sim.punctured < 2 and sim.steps < 100:
        sim.step(sim.expert_action())
    ts, vals = sim.sensor_samples(-np.inf, sim.t)
    fz = vals[:, 2] - vals[:20, 2].mean()
    assert np.abs(fz).max() > 0.5  # pushing on a membrane
    bins = np.linspace(0, sim.cfg.ascan_range_mm, sim.cfg.ascan_bins)
    ascan = vals[-1, 6:]
    for membrane in sim.membranes[2:]:  # a reflection at each intact membrane ahead of the tip
        ahead = membrane + sim.pose[2]
        if ahead < bins[-1]:
            assert ascan[np.abs(bins - ahead).argmin()] > 0.5, (ahead, ascan)
    quiet = np.all([np.abs(bins - (m + sim.pose[2])) > 0.6 for m in sim.membranes[2:]], axis=0)
    assert ascan[quiet].max() < 0.5  # and none elsewhere
    sim.close()
    assert isinstance(BlindBottomSim().cfg.peak_force_n, float)


def test_blind_bottom_is_invisible_and_the_peg_hole_is_tight():
    sim = BlindBottomSim()
    sim.reset(1)
    views = [sim.render(v) for v in ("front", "top")]
    sim._set_fixture(sim.target, sim.depth + 5.0)  # the same hole, another bottom depth
    sim._rendered_at = None
    np.testing.assert_array_equal(views, [sim.render(v) for v in ("front", "top")])
    m, mj = sim.model, sim.mj
    radius = m.geom_size[mj.mj_name2id(m, mj.mjtObj.mjOBJ_GEOM, "peg"), 0]
    wall = mj.mj_name2id(m, mj.mjtObj.mjOBJ_GEOM, "wall_px")
    inner_face = m.geom_pos[wall, 0] - m.geom_size[wall, 0]
    assert 0 < 2 * (inner_face - radius) <= 0.001  # diametral clearance <= 1 mm
    sim.close()


def test_a_disconnected_sensor_reaches_the_policy_as_missing():
    from sensorvla.world.envs.contact import ContactEnv

    env = ContactEnv(task="blind_bottom", sensor_available=False)
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(np.zeros(7))
    env.close()
    assert not obs["sensor"].any()  # no readings, stamped long before the observation (masked as missing)
    assert obs["sensor_timestamps"].max() < float(obs["timestamp"]) - 100


def test_depth_ok_is_the_touch_half_of_success(envs):
    """`depth_ok` (rollout's `depth_ok_rate`, the bench's "depth ok (touch)" column) splits success into what the
    cameras and what the sensor must get right: the needle's expert without cameras misses the mark but stops in the
    layer; the blind bottom's position-only expert seats the peg but presses too hard; the full experts do both."""
    needle, bottom = envs["sensorvla/Needle-v0"], envs["sensorvla/BlindBottom-v0"]
    no_eyes = expert_rollout(needle, episodes=2, seed=0, vision=False)
    assert no_eyes["success_rate"] == 0.0 and no_eyes["lateral_ok_rate"] == 0.0 and no_eyes["depth_ok_rate"] == 1.0
    assert expert_rollout(bottom, episodes=2, seed=0, mode="position")["depth_ok_rate"] == 0.0
    for env in (needle, bottom):
        assert expert_rollout(env, episodes=2, seed=0)["depth_ok_rate"] == 1.0


def test_the_recorder_keeps_only_successful_demos_and_says_when_it_cannot():
    """Under a hard DART push in the hole's mouth (5 mm a step) the blind bottom's expert fails the first three
    attempts of recording seed 3 and succeeds on the fourth: the recorder skips the failures, names the kept demo by
    its count, and stops with a named error once its attempt cap is reached without enough successes."""
    from sensorvla.world.contact_record import DemoRecordingError, successful_episodes

    sim = BlindBottomSim()
    noise = {"mouth_noise_mm": 5.0}
    base = 3 * 100_003  # attempt a of recording seed 3 is episode seed base + a
    assert not record_episode(sim, base, name="x", **noise).extra["success"]  # the first attempt fails
    kept = list(successful_episodes(sim, "blind_bottom", 1, 3, 5, set(), noise))
    assert [ep.name for ep in kept] == ["blind_bottom_0000"] and kept[0].extra["success"]
    np.testing.assert_array_equal(
        kept[0].actions, record_episode(sim, base + 3, name="y", **noise).actions
    )  # the kept one is the fourth attempt's, deterministically
    with pytest.raises(DemoRecordingError, match="succeeded in only 1 of 4.*max_attempts=4"):
        list(successful_episodes(sim, "blind_bottom", 2, 3, 4, set(), noise))
    sim.close()


def test_the_needle_entry_mark_is_visible_at_64px():
    """The entry mark is seen by the cameras: at 64 px its green disc covers a blob of pixels in the top view and a
    strip in the grazing front view, centred where the episode's mark is (it moves with the target), and it is drawn
    only: it never collides."""
    sim = NeedleSim()
    centroids = []
    for seed in (0, 2):
        sim.reset(seed)
        counts = {}
        for view in ("top", "front"):
            img = sim.render(view).astype(int)
            green = (img[..., 1] - img[..., 0] > 30) & (img[..., 1] > 100)
            counts[view] = int(green.sum())
            if view == "top":
                centroids.append(np.argwhere(green).mean(axis=0))
        assert counts["top"] >= 80 and counts["front"] >= 25, counts  # 3 mm: about 10 and 4-8; 5 mm: 30 and 13
    assert np.linalg.norm(centroids[0] - centroids[1]) > 4  # seeds 0 and 2: marks 9 mm apart, pixels apart
    m, mj = sim.model, sim.mj
    for name in ("entry_mark", "entry_dot"):
        g = mj.mj_name2id(m, mj.mjtObj.mjOBJ_GEOM, name)
        assert m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0
    sim.close()


def _seat_aiming_off_axis(sim: BlindBottomSim, offset_mm: float, seeds=range(1000, 1010)) -> int:
    """Episodes the guarded expert seats while aiming `offset_mm` off the hole's axis (no rendering)."""
    won = 0
    for seed in seeds:
        sim.reset(seed)
        phi = 2 * np.pi * (seed % 7) / 7
        sim.aim_offset = offset_mm * np.array([np.cos(phi), np.sin(phi)])
        while sim.steps < sim.cfg.max_steps and not (sim.success or sim.failed):
            sim.step(sim.expert_action())
        won += sim.success
    return won


def test_blind_bottom_wall_contact_is_not_the_bottom(monkeypatch):
    """The blind bottom's hand is laterally compliant and its expert is guarded along the insertion axis, so a peg
    aimed 1 mm off the axis (more than the 0.4 mm radial clearance) slides along the wall and still seats; with the
    stiff wrist and a guard on the whole force (the task before) it stops on the wall. The aim offset is the
    recorder's `aim_noise_mm` and a new episode clears it."""
    from sensorvla.world.contact import BlindBottomConfig, ContactSim

    assert _seat_aiming_off_axis(BlindBottomSim(), 1.0) >= 9
    with monkeypatch.context() as m:
        m.setattr(ContactSim, "axial_force", ContactSim.contact_force)  # the old guard: the whole force
        assert _seat_aiming_off_axis(BlindBottomSim(BlindBottomConfig(kp_xy=2000.0)), 1.0) <= 2
    sim = BlindBottomSim()
    ep = record_episode(sim, 3, name="x", aim_noise_mm=1.2)
    assert ep.extra["success"] and 0 < np.linalg.norm(sim.aim_offset) <= 1.2
    sim.reset(3)
    assert not sim.aim_offset.any()


def test_views_are_a_property_of_the_task(envs):
    """The needle observes its `top` and carriage-mounted `wrist` cameras, the peg tasks keep `front` and `top`:
    the env's images, its observation space, its view names and the recorded dataset's views all follow the task's
    `views`; a view the scene lacks or an unsorted list is refused by name."""
    from sensorvla.world.contact import NeedleConfig, PegConfig

    expected = {
        "sensorvla/PegInHole-v0": ("front", "top"),
        "sensorvla/BlindBottom-v0": ("front", "top"),
        "sensorvla/Needle-v0": ("top", "wrist"),
    }
    for env_id, views in expected.items():
        env = envs[env_id]
        obs, _ = env.reset(seed=1)
        sim = env.unwrapped.sim
        assert env.unwrapped.views == env.unwrapped.view_names == sim.views == views
        assert env.observation_space["images"].shape[0] == len(views) and env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs["images"], np.stack([sim.render(v) for v in views]))
        ep = record_episode(sim, 1, name="e", hold_steps=0)
        assert tuple(sorted(ep.images)) == views  # the recorder writes the views the task declares
        assert len(ep.images[views[-1]].frames) == len(ep.actions) + 1
    with pytest.raises(ValueError, match="sorted order"):
        NeedleConfig(views=("wrist", "top"))
    with pytest.raises(ValueError, match="distinct cameras"):
        PegConfig(views=("top", "eye"))
    with pytest.raises(ValueError, match="no camera \\['wrist'\\]"):
        PegInHoleSim(PegConfig(views=("top", "wrist"))).reset(0)  # the peg's carriage carries no wrist camera


def _dot(img: np.ndarray) -> np.ndarray:
    """The entry mark's dark dot: near-black green pixels (the table and the needle are grey)."""
    img = img.astype(int)
    return (img[..., 1] < 90) & (img[..., 1] - img[..., 0] > 15)


def test_the_wrist_view_resolves_the_mark_below_the_lateral_tolerance():
    """At the expert's alignment over the mark, the wrist camera sees the mark's dark dot as a blob of tens of pixels
    near the view's centre, and moving the hand by the lateral tolerance (1 mm) moves the dot by pixels there (the
    static views' ~1.4 mm per pixel cannot resolve it). The mark is in view 10 mm away already."""
    sim = NeedleSim()
    sim.reset(0)
    while np.linalg.norm(sim.pose[:2] - sim.target) > 0.3:  # the expert aligns over the mark at its travel height
        sim.step(sim.expert_action())
        assert sim.steps < 20
    s = sim.cfg.image_size
    dot = _dot(sim.render("wrist"))
    centre = np.argwhere(dot).mean(axis=0)
    assert dot.sum() >= 25, dot.sum()  # the 2 mm dot: about 40 px at 64 px (the top view: about 4)
    assert np.all(np.abs(centre - s / 2) < s / 4), centre
    for axis in (0, 1):
        step = np.zeros(7)
        step[axis] = sim.cfg.lateral_tol_mm
        sim.step(step)
        for _ in range(3):
            sim.step(np.zeros(7))  # settle on the new setpoint
        moved = np.argwhere(_dot(sim.render("wrist"))).mean(axis=0)
        assert np.linalg.norm(moved - centre) >= 1.5, (axis, centre, moved)
        centre = moved
    sim.step(np.array([10.0, 0, 0, 0, 0, 0, 0]))  # 10 mm away: the dot still in view
    for _ in range(5):
        sim.step(np.zeros(7))
    assert _dot(sim.render("wrist")).sum() >= 15
    sim.close()
