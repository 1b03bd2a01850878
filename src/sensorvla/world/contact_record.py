"""Scripted demonstrations of the contact tasks (`world/contact.py`), written as LeRobot v3 datasets + sidecar.

Each episode records every stream on the common clock: the expert's actions at 10 Hz, the measured pose at
`state_rate`, the task's camera views (`sim.views`) at the control rate (the frames the env observes, exposed at
each control tick) and the 500 Hz force/torque stream (plus the needle's A-scan), each reading stamped at the end of
its physics step.
Demonstrations are DART-style as in `world/synth.py`: the executed motion carries a small perturbation, the recorded
action is the expert's clean command at the visited state. A task may perturb more (`RECORDING_DEFAULTS`): the blind
bottom's expert aims up to 1.2 mm off the hole's axis (its compliant wrist slides the peg in), so that its demos meet
the hole's edge and wall and show pushing on past a contact that is not the bottom (docs/decisions.md). Only
successful demos are kept (`generate_contact_dataset` records until it has them, within a cap).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sensorvla.data.types import EpisodeData, Stream
from sensorvla.world.contact import CONTROL_RATE, TASKS, ContactSim

ENV_TASKS = {
    "sensorvla/PegInHole-v0": "peg_in_hole",
    "sensorvla/BlindBottom-v0": "blind_bottom",
    "sensorvla/Needle-v0": "needle",
}


# per task: keyword arguments of `record_episode` that `generate_contact_dataset` uses unless told otherwise
RECORDING_DEFAULTS: dict[str, dict[str, float]] = {"blind_bottom": {"aim_noise_mm": 1.2}}


class DemoRecordingError(RuntimeError):
    """The expert did not reach the requested number of successful demos within the attempt cap."""


def task_of(env_or_task: str) -> str:
    """A contact task's name from an env id or the name itself (ValueError naming the choices)."""
    task = ENV_TASKS.get(env_or_task, env_or_task)
    if task not in TASKS:
        raise ValueError(f"{env_or_task!r} is not a contact task: choose one of {sorted(ENV_TASKS)} or {sorted(TASKS)}")
    return task


def record_episode(
    sim: ContactSim,
    seed: int,
    *,
    name: str,
    with_sensor: bool = True,
    hold_steps: int = 5,
    lateral_noise_mm: float = 0.15,
    depth_noise_mm: float = 0.05,
    mouth_noise_mm: float = 0.0,
    mouth_depth_mm: tuple[float, float] = (0.0, 3.0),
    aim_noise_mm: float = 0.0,
) -> EpisodeData:
    """Run the expert on `sim` for episode `seed` and record every stream (see the module docstring).

    Execution is perturbed per step (Gaussian: `lateral_noise_mm` in x-y, `depth_noise_mm` in z) until success;
    while the tip is `mouth_depth_mm` down (z in [-hi, -lo]) and `mouth_noise_mm` > 0 the x-y perturbation is
    `mouth_noise_mm` instead (DART at the hole's mouth). Then `hold_steps` more expert steps are recorded
    unperturbed (the demonstration of holding still). `aim_noise_mm` > 0: the expert aims at a point drawn
    uniformly within that radius of the target for the whole episode (`ContactSim.aim_offset`: it meets the hole's
    edge and wall as an imprecise policy does, and shows pushing on past them). `extra["success"]` says whether the
    expert succeeded.
    """
    sim.reset(seed)
    noise_rng = np.random.default_rng([seed, 7919])
    if aim_noise_mm > 0:
        r, phi = aim_noise_mm * np.sqrt(noise_rng.uniform()), noise_rng.uniform(0, 2 * np.pi)
        sim.aim_offset = r * np.array([np.cos(phi), np.sin(phi)])
    scale = np.array([lateral_noise_mm, lateral_noise_mm, depth_noise_mm])
    mouth_scale = np.array([mouth_noise_mm, mouth_noise_mm, depth_noise_mm])
    actions, frames = [], {v: [sim.render(v)] for v in sim.views}
    extra_steps = None
    while len(actions) < sim.cfg.max_steps and (extra_steps is None or extra_steps > 0):
        a = sim.expert_action()
        actions.append(a)
        in_mouth = mouth_noise_mm > 0 and -mouth_depth_mm[1] <= sim.pose[2] <= -mouth_depth_mm[0]
        noise = noise_rng.normal(0, 1, 3) * (mouth_scale if in_mouth else scale)
        sim.step(a, perturbation=None if extra_steps is not None else noise)
        for v in sim.views:
            frames[v].append(sim.render(v))
        if extra_steps is not None:
            extra_steps -= 1
        elif sim.success:
            extra_steps = hold_steps
        elif sim.failed:
            break
    n = len(actions)
    streams = {"action": Stream(np.arange(n) / CONTROL_RATE, np.asarray(actions, np.float32))}
    state_ts, state = sim.state_samples()
    streams["state"] = Stream(state_ts, state.astype(np.float32))
    for v in sim.views:  # frame k shows the scene at tick k (the observation action k answered)
        streams[f"image.{v}"] = Stream(np.arange(n + 1) / CONTROL_RATE, np.stack(frames[v]))
    if with_sensor:
        streams["sensor"] = Stream(*sim.sensor_samples(-np.inf, sim.t))
    info = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in sim.info().items()}
    extra = {**info, "success": extra_steps is not None, "target_mm": [float(v) for v in sim.target]}
    return EpisodeData.from_streams(name, sim.instruction, streams, extra)


def generate_contact_dataset(
    out_dir: str | Path,
    *,
    task: str = "peg_in_hole",
    num_episodes: int = 50,
    seed: int = 0,
    image_size: int = 64,
    no_sensor_fraction: float = 0.0,
    progress: bool = True,
    overwrite: bool = True,
    image_format: str = "video",
    max_attempts: int | None = None,
    recording: dict[str, float] | None = None,
) -> Path:
    """Write `num_episodes` successful expert demonstrations of a contact task (an env id or a task name) as a
    LeRobot v3 dataset + sidecar, deterministic for `seed`. `no_sensor_fraction` of the episodes are recorded
    without the sensor stream (a disconnected sensor).

    Episodes the expert fails (under the DART perturbation) are dropped and the next seed is tried, up to
    `max_attempts` episodes in all (default: 2 x `num_episodes` + 10); reaching it raises `DemoRecordingError`.
    `recording`: keyword arguments of `record_episode` (noise levels), over the task's `RECORDING_DEFAULTS`."""
    from sensorvla.data.format import write_dataset

    task = task_of(task)
    sim_cls, cfg_cls = TASKS[task]
    cfg = cfg_cls(image_size=image_size)
    sim = sim_cls(cfg)
    rng = np.random.default_rng(seed)
    no_sensor = set(
        rng.choice(num_episodes, size=int(round(no_sensor_fraction * num_episodes)), replace=False).tolist()
    )
    noise = {**RECORDING_DEFAULTS.get(task, {}), **(recording or {})}
    cap = 2 * num_episodes + 10 if max_attempts is None else max_attempts
    episodes = successful_episodes(sim, task, num_episodes, seed, cap, no_sensor, noise)
    try:
        return write_dataset(
            episodes,
            out_dir,
            dataset_id=f"contact_{task}_s{seed}_n{num_episodes}_px{image_size}",
            action_fps=CONTROL_RATE,
            min_actions=4,
            overwrite=overwrite,
            progress=progress,
            image_format=image_format,
            extra_info={
                "sensor_rate": cfg.sensor_rate,
                "force_channels": sim.force_channels,
                "state_rate": cfg.state_rate,
                "camera_rate": CONTROL_RATE,
                "task": task,
                "recording": {"successful_only": True, **noise},
                "sensor_names": sim.sensor_names(),
                "action_semantics": "per-100ms hand setpoint deltas [dx,dy,dz mm; droll,dpitch,dyaw deg: unused; tool]",
            },
        )
    finally:
        sim.close()


def successful_episodes(
    sim: ContactSim,
    task: str,
    num_episodes: int,
    seed: int,
    max_attempts: int,
    no_sensor: set[int],
    noise: dict[str, float],
) -> Iterator[EpisodeData]:
    """Yield `num_episodes` successful demos (episode seeds seed * 100_003 + attempt, in order; failures skipped),
    named `<task>_<kept index>`; `DemoRecordingError` once `max_attempts` episodes were tried without enough."""
    kept = attempt = 0
    while kept < num_episodes:
        if attempt >= max_attempts:
            raise DemoRecordingError(
                f"the {task} expert succeeded in only {kept} of {attempt} recorded episodes (wanted {num_episodes} "
                f"within max_attempts={max_attempts}, perturbation {noise or 'default'}): lower the DART noise "
                "(`recording=`), or raise max_attempts"
            )
        ep = record_episode(sim, seed * 100_003 + attempt, name=f"{task}_{kept:04d}", with_sensor=kept not in no_sensor,
                            **noise)  # fmt: skip
        attempt += 1
        if ep.extra["success"]:
            kept += 1
            yield ep


def expert_rollout(env, *, episodes: int = 10, seed: int = 0, mode: str | None = None, vision: bool = True) -> dict:
    """The scripted expert of a contact env in closed loop through the env (seeds seed .. seed + episodes - 1).

    `mode`: one of the task's `expert_modes` (the first by default: the expert with every sense; blind bottom also
    has "position", the needle "sensor_blind"); `vision=False`: the expert assumes the target at the workspace
    centre. Returns `eval.rollout.summarize`'s rates and the per-episode results.
    """
    from sensorvla.eval.rollout import scripted_episodes, summarize

    sim = env.unwrapped.sim
    mode = mode or sim.expert_modes[0]
    if mode not in sim.expert_modes:
        raise ValueError(f"expert mode {mode!r}: this task has {sim.expert_modes}")
    try:
        sim.expert_mode, sim.expert_vision = mode, vision
        results = scripted_episodes(env, sim.expert_action, episodes=episodes, seed=seed)
    finally:
        sim.expert_mode, sim.expert_vision = sim.expert_modes[0], True
    return {**summarize(results), "episodes": episodes, "mode": mode, "vision": vision, "results": results}
