"""Closed-loop rollouts of a PolicyRunner in a Gymnasium env, with chunked execution and videos.

An adapter pair maps env observations to runner observations and runner actions to env actions; the
defaults are identities (the built-in insertion env already speaks the runner's observation dict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.eval.rollout_video import EpisodeRecorder, SensorPanel
from sensorvla.inference.action_queue import ActionChunkBroker

logger = logging.getLogger(__name__)


def ablate(obs: dict[str, Any], stream: str | None = None) -> dict[str, Any]:
    """The same observation with no samples of any sensor stream, or of the one named (`sensor` = the dataset's sensor
    tensor, else a declared stream's name): zero rows, so the runner's history of it stays empty."""
    out = dict(obs)
    for key in obs:
        name = key.partition(".")[2] or "sensor"
        if key.partition(".")[0] == "sensor" and stream in (None, name):
            out[key] = np.zeros((0, *np.asarray(obs[key]).shape[1:]), np.float32)
            out[key.replace("sensor", "sensor_timestamps", 1)] = np.zeros(0, np.float64)
    return out


VISION_ABLATIONS = ("blank", "shuffled")


def blank_images(obs: dict[str, Any]) -> dict[str, Any]:
    """The same observation with every camera view black (vision ablated)."""
    out = dict(obs)
    out["images"] = np.zeros_like(np.asarray(obs["images"]))
    return out


class AblatedPolicy:
    """`runner.infer` behind the rollout's ablations (no sensor, blank or another scene's views); keeps latencies."""

    def __init__(self, runner, ablate_sensor: bool | str, ablate_vision: str | None):
        self.runner, self.ablate_sensor, self.ablate_vision = runner, ablate_sensor, ablate_vision
        self.images: np.ndarray | None = None  # the views shown instead ("shuffled")
        self.latencies: list[float] = []

    def __call__(self, obs: dict) -> dict:
        """Ablate `obs` as configured and infer; the runner's output dict."""
        if self.ablate_sensor:  # True: every stream; a name: that stream
            obs = ablate(obs, None if self.ablate_sensor is True else self.ablate_sensor)
        if self.ablate_vision == "blank":
            obs = blank_images(obs)
        elif self.ablate_vision == "shuffled":
            obs = dict(obs, images=self.images)
        out = self.runner.infer(obs)
        self.latencies.append(out["timing"]["total_ms"])
        return out


def run_episode(env, obs, broker, obs_adapter, action_adapter, recorder=None) -> dict:
    """Step `env` from `obs` with the broker's chunked actions until it ends; the episode's result. An
    `EpisodeRecorder` gets every observation and action (for the episode's video)."""
    if recorder is not None:
        recorder.observe(obs, env.render)
    steps, info, done = 0, {}, False
    while not done:
        action = broker.step(obs_adapter(obs))
        obs, _, terminated, truncated, info = env.step(action_adapter(np.asarray(action)))
        steps += 1
        done = terminated or truncated
        if recorder is not None:
            recorder.act(np.asarray(action))
            recorder.observe(obs, env.render)
    return episode_result(info, steps)


def episode_result(info: dict, steps: int) -> dict:
    """An episode's result from the env's last `info` after `steps` steps: success, length and the task's final
    metrics (None where the env does not report one)."""
    return {
        "success": bool(info.get("success", False)),
        "length": steps,
        "final_layer_distance_mm": info.get("layer_distance_mm"),
        "final_depth_error_mm": info.get("depth_error_mm"),
        "final_lateral_error_mm": info.get("lateral_error_mm"),
        "lateral_ok": info.get("lateral_ok"),
        "depth_ok": info.get("depth_ok"),
        "peak_force_n": info.get("peak_force_n"),
        "final_contact_force_n": info.get("contact_force_n"),
    }


def scripted_episodes(env, act: Callable[[], Any], *, episodes: int, seed: int) -> list[dict]:
    """A scripted controller in closed loop: episodes seeded seed .. seed + episodes - 1, each step's action
    `act()` (read from the env's state, e.g. its expert); each episode's `episode_result`."""
    results = []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        steps, done, info = 0, False, {}
        while not done:
            _, _, terminated, truncated, info = env.step(act())
            steps, done = steps + 1, terminated or truncated
        results.append(episode_result(info, steps))
    return results


def rollout(
    runner,
    env,
    *,
    episodes: int = 10,
    execute_steps: int = 4,
    ablate_sensor: bool | str = False,
    ablate_vision: str | None = None,
    obs_adapter: Callable[[dict], dict] | None = None,
    action_adapter: Callable[[np.ndarray], Any] | None = None,
    video_dir: str | Path | None = None,
    videos: str = "outcomes",
    seed: int = 0,
    progress: bool | str = False,
) -> dict:
    """Run `episodes` episodes; execute `execute_steps` of each predicted chunk before re-querying.

    Args:
        ablate_sensor: the policy gets no sensor samples (True), or none of the stream named (`sensor`: the tensor).
        ablate_vision: "blank" (black views) or "shuffled" (every view of each episode replaced by the views
            of another scene: the reset frames of other seeds, never evaluated), or None.
        video_dir: where the episodes' mp4 videos go (`eval/rollout_video.py`: the views, the sensor trace with
            a cursor, the action, the outcome); None writes none.
        videos: which episodes get a video (`VIDEO_CHOICES`): "first", "success" / "failure" (the first
            such episode, else the first episode), "outcomes" (the first success and the first failure) or "all".

    Returns success_rate, lateral_ok_rate and depth_ok_rate (where the env reports `lateral_ok` / `depth_ok`: the
    seeing and the touch halves of success), mean final lateral / depth errors, mean episode length and inference
    latency, the per-episode results and the videos written ({"episode", "success", "path"} each).
    """
    from sensorvla.progress import progress as track

    _check_arguments(videos, ablate_vision, env, runner, obs_adapter)
    obs_adapter = obs_adapter or (lambda o: o)
    action_adapter = action_adapter or (lambda a: a)
    others: list[np.ndarray] = []
    if ablate_vision == "shuffled":  # scenes of seeds outside the evaluated range
        others = [np.asarray(env.reset(seed=seed + episodes + 1000 + k)[0]["images"]).copy() for k in range(8)]
    policy = AblatedPolicy(runner, ablate_sensor, ablate_vision)
    broker = ActionChunkBroker(policy, execute_steps=execute_steps)
    blind = ["blind"] if ablate_sensor is True else [f"no_{ablate_sensor}"] if ablate_sensor else []  # a name: one
    tag = "_".join(blind + [f"vision_{ablate_vision}"] * bool(ablate_vision)) or "sensor"
    results = []
    chooser = VideoChooser(videos if video_dir is not None else "none")
    for ep in track(range(episodes), desc=f"rollout {tag}", unit="episodes", mode=progress):
        obs, _ = env.reset(seed=seed + ep)
        if others:
            policy.images = others[ep % len(others)]
        runner.reset()
        broker.reset()
        recorder = EpisodeRecorder(**_recorder_kwargs(env)) if chooser.recording else None
        result = run_episode(env, obs, broker, obs_adapter, action_adapter, recorder)
        results.append({"episode": ep, **result})
        if recorder is not None:
            chooser.offer(ep, result["success"], recorder)
    written = [
        _write_video(rec, Path(video_dir), ep, ok, tag, runner, ablate_sensor, ablate_vision)
        for ep, ok, rec in chooser.chosen()
    ]
    latencies = policy.latencies
    summary = summarize(results)
    summary.update(
        episodes=episodes,
        mean_infer_ms=float(np.mean(latencies)) if latencies else 0.0,
        sensor_ablated=ablate_sensor,
        vision_ablated=ablate_vision,
        execute_steps=execute_steps,
        results=results,
        videos=written,
    )
    logger.info(
        "rollout: success %.2f, lateral ok %s over %d episodes (sensor %s, vision %s)%s",
        summary["success_rate"],
        summary["lateral_ok_rate"],
        episodes,
        "ablated" if ablate_sensor else "on",
        ablate_vision or "on",
        "".join(f"; video {v['path']}" for v in written),
    )
    return summary


def _check_arguments(videos: str, ablate_vision: str | None, env, runner, obs_adapter) -> None:
    """ValueError naming the choices for an unknown `videos` or `ablate_vision`; the env's views against the
    policy's where the observations go to it unadapted (`check_view_names`)."""
    if obs_adapter is None:
        check_view_names(env, runner)
    if videos not in VIDEO_CHOICES:
        raise ValueError(f"videos={videos!r}: choose one of {VIDEO_CHOICES}")
    if ablate_vision not in (None, *VISION_ABLATIONS):
        raise ValueError(f"ablate_vision={ablate_vision!r}: choose one of {VISION_ABLATIONS} or None")


VIDEO_CHOICES = ("none", "first", "success", "failure", "outcomes", "all")


class VideoChooser:
    """Which episodes of a rollout get a video (`rollout`'s `videos`), holding at most a few recordings."""

    def __init__(self, choice: str):
        self.choice = choice
        self.kept: list[tuple[int, bool, Any]] = []  # (episode, success, recorder), in episode order
        self.fallback: tuple[int, bool, Any] | None = None  # "success"/"failure": the first episode

    @property
    def recording(self) -> bool:
        """Whether the next episode may still be chosen (else it is not recorded at all)."""
        if self.choice == "none":
            return False
        if self.choice == "outcomes":
            return len({ok for _, ok, _ in self.kept}) < 2
        return self.choice == "all" or not self.kept

    def offer(self, episode: int, success: bool, recorder) -> None:
        """Keep the finished episode when the choice wants it."""
        item = (episode, success, recorder)
        wanted = {
            "all": True,
            "first": not self.kept,
            "outcomes": success not in {ok for _, ok, _ in self.kept},
        }
        if wanted.get(self.choice, False):
            self.kept.append(item)
        elif self.choice in ("success", "failure") and not self.kept:
            if success == (self.choice == "success"):
                self.kept.append(item)
            elif self.fallback is None:
                self.fallback = item

    def chosen(self) -> list[tuple[int, bool, Any]]:
        """The episodes to write (the fallback when no episode had the outcome asked for)."""
        if not self.kept and self.fallback is not None:
            return [self.fallback]
        return self.kept


def check_view_names(env, runner) -> None:
    """The env's views (`unwrapped.view_names`) against the policy's (`cfg.data.views` / `data_cfg.views`), both in
    the order of `obs["images"]`: the same names in another order is a ValueError (the policy would see each view as
    another); other names only a warning (an env recorded under other names), nothing where either is unknown."""
    have = getattr(getattr(env, "unwrapped", env), "view_names", None)
    data = getattr(getattr(runner, "cfg", None), "data", None) or getattr(runner, "data_cfg", None)
    want = getattr(data, "views", None)
    if not have or not want or list(have) == list(want):
        return
    if sorted(have) == sorted(want):
        raise ValueError(
            f"the env's views are {list(have)} but the policy was trained on {list(want)} in that order: reorder the "
            "env's images (an obs_adapter) so that each view reaches the policy as the one it learnt"
        )
    logger.warning(
        "the env's views %s are not the ones the policy was trained on %s: they are matched by position; a policy "
        "trained on another camera set (e.g. the needle's before its wrist camera) needs retraining",
        list(have),
        list(want),
    )


def _recorder_kwargs(env) -> dict:
    """The env's view names (its `view_names`, when it has them) and frame rate for an `EpisodeRecorder`."""
    unwrapped = getattr(env, "unwrapped", env)
    fps = float(getattr(unwrapped, "metadata", {}).get("render_fps", 10))
    return {"view_names": getattr(unwrapped, "view_names", None), "fps": fps}


def _write_video(recorder, video_dir: Path, episode: int, success: bool, tag: str, runner, ablate_sensor: bool,
                 ablate_vision: str | None) -> dict:  # fmt: skip
    """Write one chosen episode's mp4; its {"episode", "success", "path"}."""
    from sensorvla.data.layout import ACTION_NAMES_7

    what = "all modalities"
    if ablate_sensor:
        what = "sensor ablated (the policy sees no sensor; the trace is what it missed)"
        what = what if ablate_sensor is True else f"stream {ablate_sensor} ablated"
    if ablate_vision:
        what = f"views ablated ({ablate_vision})" + (" + " + what if ablate_sensor else "")
    force = getattr(getattr(getattr(getattr(runner, "cfg", None), "model", None), "sensor", None), "force_channels", 0)
    names = ["force"] if force == 1 else [f"force {i}" for i in range(force)]
    panel = SensorPanel(lines=range(force), names=names) if force else SensorPanel()
    dims = len(recorder.actions[0]) if recorder.actions else 0
    path = video_dir / f"episode_{episode:02d}_{tag}_{'success' if success else 'failure'}.mp4"
    recorder.write(
        path,
        success=success,
        title=f"episode {episode}: {what}",
        action_names=ACTION_NAMES_7 if dims == 7 else None,
        sensor_panel=panel,
    )
    return {"episode": episode, "success": success, "path": str(path)}


def summarize(results: list[dict]) -> dict[str, Any]:
    """Per-episode results -> rates and mean errors (None where the env does not report a quantity)."""

    def mean(key: str) -> float | None:
        vals = [r[key] for r in results if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "success_rate": float(np.mean([r["success"] for r in results])),
        "lateral_ok_rate": mean("lateral_ok"),
        "depth_ok_rate": mean("depth_ok"),
        "mean_final_lateral_error_mm": mean("final_lateral_error_mm"),
        "mean_final_depth_error_mm": mean("final_depth_error_mm"),
        "mean_episode_length": float(np.mean([r["length"] for r in results])),
    }


def rollout_table(rows: dict[str, dict], labels: dict[str, str] | None = None) -> str:
    """`summarize` rows -> a markdown table (success, lateral within tolerance, mean errors), one line per row in
    `labels`' order and words (default: every row, its name in words)."""

    def fmt(v, pct=False):
        return "–" if v is None else (f"{100 * v:.0f} %" if pct else f"{v:.2f}")

    lines = [
        "| policy | success | lateral error within tolerance | mean lateral error (mm) | mean depth error (mm) |",
        "|---|---|---|---|---|",
    ]
    for key, label in (labels or {k: k.replace("_", " ") for k in rows}).items():
        if (r := rows.get(key)) is not None:
            lines.append(
                f"| {label} | {fmt(r['success_rate'], True)} | {fmt(r.get('lateral_ok_rate'), True)} | "
                f"{fmt(r.get('mean_final_lateral_error_mm'))} | {fmt(r.get('mean_final_depth_error_mm'))} |"
            )
    return "\n".join(lines)


def expert_rollout(env, *, episodes: int = 10, seed: int = 0, blind: bool = False, vision_blind: bool = False) -> dict:
    """The scripted expert of the insertion env. `blind` assumes the mean layer depth (no sensor);
    `vision_blind` assumes the target at the workspace centre (no cameras)."""

    def act() -> np.ndarray:
        sim = env.unwrapped.sim  # a new simulator every episode
        true_depth, true_target = sim.depth, sim.target.copy()
        if blind:
            sim.depth = 4.0
        if vision_blind:
            sim.target = np.zeros(2)
        action = sim.expert_action()
        sim.depth, sim.target = true_depth, true_target
        return action

    return summarize(scripted_episodes(env, act, episodes=episodes, seed=seed))
