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


VISION_ABLATIONS = ("blank", "shuffled")


def blank_images(obs: dict[str, Any]) -> dict[str, Any]:
    """The same observation with every camera view black (vision ablated)."""
    out = dict(obs)
    out["images"] = np.zeros_like(np.asarray(obs["images"]))
    return out


class AblatedPolicy:
    """`runner.infer` behind the rollout's ablations (no sensor, blank or another scene's views); keeps latencies."""

    def __init__(self, runner, ablate_sensor: bool, ablate_vision: str | None):
        self.runner, self.ablate_sensor, self.ablate_vision = runner, ablate_sensor, ablate_vision
        self.images: np.ndarray | None = None  # the views shown instead ("shuffled")
        self.latencies: list[float] = []

    def __call__(self, obs: dict) -> dict:
        """Ablate `obs` as configured and infer; the runner's output dict."""
        if self.ablate_sensor:
            obs = ablate(obs)
        if self.ablate_vision == "blank":
            obs = blank_images(obs)
        elif self.ablate_vision == "shuffled":
            obs = dict(obs, images=self.images)
        out = self.runner.infer(obs)
        self.latencies.append(out["timing"]["total_ms"])
        return out


def run_episode(env, obs, broker, obs_adapter, action_adapter, record: bool) -> tuple[dict, list[np.ndarray]]:
    """Step `env` from `obs` with the broker's chunked actions until it ends; (episode result, rendered frames)."""
    frames = [env.render()] if record else []
    steps, info, done = 0, {}, False
    while not done:
        action = broker.step(obs_adapter(obs))
        obs, _, terminated, truncated, info = env.step(action_adapter(np.asarray(action)))
        steps += 1
        done = terminated or truncated
        if record:
            frames.append(env.render())
    result = {
        "success": bool(info.get("success", False)),
        "length": steps,
        "final_layer_distance_mm": info.get("layer_distance_mm"),
        "final_depth_error_mm": info.get("depth_error_mm"),
        "final_lateral_error_mm": info.get("lateral_error_mm"),
        "lateral_ok": info.get("lateral_ok"),
    }
    return result, frames


def rollout(
    runner,
    env,
    *,
    episodes: int = 10,
    execute_steps: int = 4,
    ablate_sensor: bool = False,
    ablate_vision: str | None = None,
    obs_adapter: Callable[[dict], dict] | None = None,
    action_adapter: Callable[[np.ndarray], Any] | None = None,
    video_dir: str | Path | None = None,
    max_videos: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Run `episodes` episodes; execute `execute_steps` of each predicted chunk before re-querying.

    Args:
        ablate_sensor: the policy gets no sensor samples.
        ablate_vision: "blank" (black views) or "shuffled" (every view of each episode replaced by the views
            of another scene: the reset frames of other seeds, never evaluated), or None.

    Returns success_rate, lateral_ok_rate (final lateral error within the env's tolerance, when it reports
    `lateral_ok`), mean final lateral / depth errors, mean episode length and inference latency, and the
    per-episode results.
    """
    from tqdm.auto import tqdm

    if ablate_vision not in (None, *VISION_ABLATIONS):
        raise ValueError(f"ablate_vision={ablate_vision!r}: choose one of {VISION_ABLATIONS} or None")
    obs_adapter = obs_adapter or (lambda o: o)
    action_adapter = action_adapter or (lambda a: a)
    others: list[np.ndarray] = []
    if ablate_vision == "shuffled":  # scenes of seeds outside the evaluated range
        others = [np.asarray(env.reset(seed=seed + episodes + 1000 + k)[0]["images"]).copy() for k in range(8)]
    policy = AblatedPolicy(runner, ablate_sensor, ablate_vision)
    broker = ActionChunkBroker(policy, execute_steps=execute_steps)
    tag = "_".join(["blind"] * ablate_sensor + [f"vision_{ablate_vision}"] * bool(ablate_vision)) or "sensor"
    results = []
    for ep in tqdm(range(episodes), desc="rollout", disable=not progress):
        obs, _ = env.reset(seed=seed + ep)
        if others:
            policy.images = others[ep % len(others)]
        runner.reset()
        broker.reset()
        record = video_dir is not None and ep < max_videos
        result, frames = run_episode(env, obs, broker, obs_adapter, action_adapter, record)
        results.append({"episode": ep, **result})
        if record:
            _save_gif(frames, Path(video_dir) / f"episode_{ep:02d}_{tag}.gif")
    latencies = policy.latencies
    summary = summarize(results)
    summary.update(
        episodes=episodes,
        mean_infer_ms=float(np.mean(latencies)) if latencies else 0.0,
        sensor_ablated=ablate_sensor,
        vision_ablated=ablate_vision,
        execute_steps=execute_steps,
        results=results,
    )
    logger.info(
        "rollout: success %.2f, lateral ok %s over %d episodes (sensor %s, vision %s)",
        summary["success_rate"],
        summary["lateral_ok_rate"],
        episodes,
        "ablated" if ablate_sensor else "on",
        ablate_vision or "on",
    )
    return summary


def summarize(results: list[dict]) -> dict[str, Any]:
    """Per-episode results -> rates and mean errors (None where the env does not report a quantity)."""

    def mean(key: str) -> float | None:
        vals = [r[key] for r in results if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "success_rate": float(np.mean([r["success"] for r in results])),
        "lateral_ok_rate": mean("lateral_ok"),
        "mean_final_lateral_error_mm": mean("final_lateral_error_mm"),
        "mean_final_depth_error_mm": mean("final_depth_error_mm"),
        "mean_episode_length": float(np.mean([r["length"] for r in results])),
    }


def expert_rollout(env, *, episodes: int = 10, seed: int = 0, blind: bool = False, vision_blind: bool = False) -> dict:
    """The scripted expert of the insertion env. `blind` assumes the mean layer depth (no sensor);
    `vision_blind` assumes the target at the workspace centre (no cameras)."""
    results = []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        sim = env.unwrapped.sim
        steps, done, info = 0, False, {}
        while not done:
            true_depth, true_target = sim.depth, sim.target.copy()
            if blind:
                sim.depth = 4.0
            if vision_blind:
                sim.target = np.zeros(2)
            action = sim.expert_action()
            sim.depth, sim.target = true_depth, true_target
            _, _, terminated, truncated, info = env.step(action)
            steps += 1
            done = terminated or truncated
        results.append(
            {
                "success": bool(info.get("success")),
                "length": steps,
                "final_lateral_error_mm": info.get("lateral_error_mm"),
                "final_depth_error_mm": info.get("depth_error_mm"),
                "lateral_ok": info.get("lateral_ok"),
            }
        )
    return summarize(results)
