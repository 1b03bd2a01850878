"""The MuJoCo contact benchmark's costs and expert rates on this CPU (`world/contact.py`).

Per task: the scripted expert's success rate in every expert mode (with and without cameras), the physics cost per
10 Hz env step (50 physics steps with the 500 Hz force/torque readings), the offscreen render time per 64 px view,
env steps per second with the task's views rendered, and the time to record one demonstration into a LeRobot dataset.
Wall and CPU seconds side by side (the machine may be shared).

Run: `python benchmarks/run.py contact [episodes]` (default 40).
"""

from __future__ import annotations

import time
from pathlib import Path

from _scratch import scratch_dir


def _timed_episodes(env, episodes: int, seed: int) -> dict:
    """Expert episodes through the env, with the physics and the rendering timed apart."""
    sim = env.unwrapped.sim
    physics_wall = physics_cpu = render_wall = render_cpu = 0.0
    steps = frames = 0
    for ep in range(episodes):
        sim.reset(seed + ep)
        while not (sim.success or sim.failed or sim.steps >= sim.cfg.max_steps):
            a = sim.expert_action()
            w, c = time.perf_counter(), time.process_time()
            sim.step(a)
            physics_wall += time.perf_counter() - w
            physics_cpu += time.process_time() - c
            w, c = time.perf_counter(), time.process_time()
            for view in sim.views:  # the task's cameras (the needle: top and wrist)
                sim.render(view)
            render_wall += time.perf_counter() - w
            render_cpu += time.process_time() - c
            steps, frames = steps + 1, frames + len(sim.views)
    return {
        "env_steps": steps,
        "physics_ms_per_step": 1000 * physics_wall / steps,
        "physics_cpu_ms_per_step": 1000 * physics_cpu / steps,
        "render_ms_per_frame": 1000 * render_wall / frames,
        "render_cpu_ms_per_frame": 1000 * render_cpu / frames,
        "env_steps_per_s": steps / (physics_wall + render_wall),
    }


def run(episodes: int = 40, seed: int = 1000) -> list[dict]:
    import gymnasium as gym

    from sensorvla.world.contact_record import ENV_TASKS, expert_rollout, generate_contact_dataset
    from sensorvla.world.envs import register_envs

    register_envs()
    rows = []
    root = Path(scratch_dir("bench_contact_"))
    for env_id, task in ENV_TASKS.items():
        env = gym.make(env_id)
        sim = env.unwrapped.sim
        rates = {}
        for mode in sim.expert_modes:
            for vision in (True, False):
                r = expert_rollout(env, episodes=episodes, seed=seed, mode=mode, vision=vision)
                rates[f"{mode}{'' if vision else ', no cameras'}"] = r["success_rate"]
        costs = _timed_episodes(env, min(episodes, 10), seed)
        env.close()
        w, c = time.perf_counter(), time.process_time()
        generate_contact_dataset(root / task, task=task, num_episodes=5, progress=False)
        record = {
            "record_s_per_episode": (time.perf_counter() - w) / 5,
            "record_cpu_s_per_episode": (time.process_time() - c) / 5,
        }
        rows.append({"env": env_id, "episodes": episodes, "expert_success": rates, **costs, **record})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| env | expert success (mode: rate) | physics ms/step (CPU) | render ms/view (CPU) | env steps/s "
        "| record s/episode (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rates = ", ".join(f"{k}: {v:.0%}" for k, v in r["expert_success"].items())
        lines.append(
            f"| {r['env']} | {rates} | {r['physics_ms_per_step']:.1f} ({r['physics_cpu_ms_per_step']:.1f}) | "
            f"{r['render_ms_per_frame']:.2f} ({r['render_cpu_ms_per_frame']:.2f}) | {r['env_steps_per_s']:.0f} | "
            f"{r['record_s_per_episode']:.2f} ({r['record_cpu_s_per_episode']:.2f}) |"
        )
    return "\n".join(lines)
