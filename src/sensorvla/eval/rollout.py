"""Closed-loop rollouts of a PolicyRunner in a Gymnasium env, with chunked execution and GIFs.

An adapter pair maps env observations to runner observations and runner actions to env actions; the
defaults are identities (the built-in insertion env already speaks the runner's observation dict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.inference.action_queue import ActionChunkBroker

logger = logging.getLogger(__name__)


def ablate(obs: dict[str, Any]) -> dict[str, Any]:
    """The same observation with no sensor samples (zero rows: the runner's history stays empty)."""
    out = dict(obs)
    if "sensor" in obs:
        out["sensor"] = np.zeros((0, np.asarray(obs["sensor"]).shape[-1]), np.float32)
        out["sensor_timestamps"] = np.zeros(0, np.float64)
    return out


def _save_gif(frames: list[np.ndarray], path: Path, fps: int = 10) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def rollout(
    runner,
    env,
    *,
    episodes: int = 10,
    execute_steps: int = 4,
    ablate_sensor: bool = False,
    obs_adapter: Callable[[dict], dict] | None = None,
    action_adapter: Callable[[np.ndarray], Any] | None = None,
    video_dir: str | Path | None = None,
    max_videos: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Run `episodes` episodes; execute `execute_steps` of each predicted chunk before re-querying.

    Returns success_rate, mean_episode_length, mean inference latency and per-episode results.
    """
    from tqdm.auto import tqdm

    obs_adapter = obs_adapter or (lambda o: o)
    action_adapter = action_adapter or (lambda a: a)
    results, latencies = [], []

    def policy(obs: dict) -> dict:
        out = runner.infer(ablate(obs) if ablate_sensor else obs)
        latencies.append(out["timing"]["total_ms"])
        return out

    broker = ActionChunkBroker(policy, execute_steps=execute_steps)
    for ep in tqdm(range(episodes), desc="rollout", disable=not progress):
        obs, _ = env.reset(seed=seed + ep)
        runner.reset()
        broker.reset()
        frames = [env.render()] if video_dir is not None and ep < max_videos else None
        steps, info, done = 0, {}, False
        while not done:
            action = broker.step(obs_adapter(obs))
            obs, _, terminated, truncated, info = env.step(action_adapter(np.asarray(action)))
            steps += 1
            done = terminated or truncated
            if frames is not None:
                frames.append(env.render())
        success = bool(info.get("success", False))
        results.append(
            {
                "episode": ep,
                "success": success,
                "length": steps,
                "final_layer_distance_mm": info.get("layer_distance_mm"),
                "final_lateral_error_mm": info.get("lateral_error_mm"),
            }
        )
        if frames is not None:
            tag = "blind" if ablate_sensor else "sensor"
            _save_gif(frames, Path(video_dir) / f"episode_{ep:02d}_{tag}.gif")
    summary = {
        "episodes": episodes,
        "success_rate": float(np.mean([r["success"] for r in results])),
        "mean_episode_length": float(np.mean([r["length"] for r in results])),
        "mean_infer_ms": float(np.mean(latencies)) if latencies else 0.0,
        "mean_final_lateral_error_mm": float(np.mean([r["final_lateral_error_mm"] or 0.0 for r in results])),
        "sensor_ablated": ablate_sensor,
        "execute_steps": execute_steps,
        "results": results,
    }
    logger.info(
        "rollout: success %.2f over %d episodes (sensor %s)",
        summary["success_rate"],
        episodes,
        "ablated" if ablate_sensor else "on",
    )
    return summary


def expert_rollout(env, *, episodes: int = 10, seed: int = 0, blind: bool = False) -> dict:
    """The scripted expert of the insertion env; `blind` assumes the mean layer depth (what vision alone allows)."""
    successes, lengths = [], []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        sim = env.unwrapped.sim
        steps, done, info = 0, False, {}
        while not done:
            true_depth = sim.depth
            if blind:
                sim.depth = 4.0
            action = sim.expert_action()
            sim.depth = true_depth
            _, _, terminated, truncated, info = env.step(action)
            steps += 1
            done = terminated or truncated
        successes.append(bool(info.get("success")))
        lengths.append(steps)
    return {"success_rate": float(np.mean(successes)), "mean_episode_length": float(np.mean(lengths))}
