"""`sensorvla bench sim --task T`: a simulated task end to end, beside a plain CNN on the same CPU-seconds.

The env's scripted expert records demos -> a LeRobot v3 dataset (+ sensor sidecar) -> the two-stage recipe
(`small-data-stage1` / `small-data-stage2`, presets.py) on the tiny Qwen-VL within a stated budget (stage-1
epochs, stage-2 steps) -> closed loop over N seeded episodes: all modalities / sensor ablated / vision ablated.
Beside it the plain CNN reference (eval/cnn_baseline.py), with and without the sensor, trained on the same demos
for exactly the CPU-seconds our cache + stage 1 + stage 2 took (process + reaped children, `runtime.cpu_seconds`).
Every phase records wall and CPU-seconds. Output: a table on the terminal, `bench.json` and `report.md`.

An env works here when it speaks the observation dict of `sensorvla/Insertion-v0` (images (V, h, w, 3), state,
sensor rows with their timestamps, timestamp, instruction) and has a scripted expert:
`env.unwrapped.expert_action()` (or `env.unwrapped.sim.expert_action()`). Optional: `env.unwrapped.views` (view
names) and `env.unwrapped.force_channels` (leading force channels of the sensor, default 1).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorvla.config import ConfigError

# short name -> env id; any registered env id works as well
TASKS = {
    "insertion": "sensorvla/Insertion-v0",
    "peg-in-hole": "sensorvla/PegInHole-v0",
    "blind-bottom": "sensorvla/BlindBottom-v0",
    "needle": "sensorvla/Needle-v0",
}
ROWS = ("all", "sensor_ablated", "vision_ablated")
CNN_ROWS = ("cnn_with_sensor", "cnn_without_sensor")


@dataclass
class BenchSettings:
    """One benchmark run: the task, the demos, our budget (epochs / steps), the closed loop and the CNN's."""

    task: str = "peg-in-hole"
    demos: int = 50  # successful expert episodes recorded
    image_size: int = 64  # camera side in px, where the env takes it (Insertion-v0: SimConfig.image_size)
    episodes: int = 40  # seeded closed-loop episodes per row
    eval_seed: int = 1000  # closed-loop episodes use seeds eval_seed.. (the demos use 0..)
    execute_steps: int = 1  # actions executed per predicted chunk: 1 = re-plan every control step (docs/sim.md)
    vl_refresh_every: int = 1  # fast-slow: the VL features are recomputed every k policy queries, reused between
    patch_size: int = 7  # the tiny model's patches: 14 px tokens
    pixels: int = 112 * 112  # views are resized to this many pixels (64 px -> 112 px: 8 x 8 tokens per view)
    stage1_epochs: int = 20
    stage2_steps: int = 160
    cnn: bool = True
    cnn_cpu_s: float = 0.0  # the CNN's CPU-seconds; 0 = exactly what our training took
    cnn_max_steps: int = 0  # a step cap for smoke tests only (0 = none); recorded beside the budget
    vl_model: str = ""  # a backbone folder instead of building the tiny one
    videos: str = "none"  # rollout videos per row under out/rollout/<row>/ (eval.rollout.VIDEO_CHOICES)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys on top of the presets
    reuse: bool = False  # reuse out/'s dataset and trained policy (same task, demos, budget): closed loop only

    def __post_init__(self):
        if self.execute_steps < 1 or self.vl_refresh_every < 1:
            raise ConfigError(
                f"execute_steps={self.execute_steps}, vl_refresh_every={self.vl_refresh_every}: both must be >= 1 "
                "(1 = re-plan every control step / recompute the VL features at every query)"
            )

    def env_id(self) -> str:
        """The env id of `task` (a short name of TASKS or a registered id); ConfigError naming the choices."""
        import gymnasium as gym

        from sensorvla.world.envs import register_envs

        register_envs()
        env_id = TASKS.get(self.task, self.task)
        if env_id not in gym.registry:
            raise ConfigError(
                f"--task {self.task!r} is not a registered env; choose one of {sorted(TASKS)} or an env id "
                "(the MuJoCo tasks need `pip install sensorvla[sim]`)"
            )
        return env_id


CONTACT_ENVS = ("sensorvla/PegInHole-v0", "sensorvla/BlindBottom-v0", "sensorvla/Needle-v0")  # world/contact.py


def make_env(env_id: str, image_size: int):
    """The env at `image_size` px where it takes one (the insertion env through its SimConfig, the contact envs
    through `image_size`); the built-in envs are registered first."""
    import gymnasium as gym

    from sensorvla.world.envs import register_envs

    register_envs()
    if env_id.startswith("sensorvla/Insertion"):
        from sensorvla.world.synth import SimConfig

        return gym.make(env_id, sim_config=SimConfig(image_size=image_size))
    if env_id in CONTACT_ENVS:
        return gym.make(env_id, image_size=image_size)
    return gym.make(env_id)


def record_task_demos(env_id: str, out: Path, demos: int, image_size: int, seed: int = 0) -> dict:
    """The task's own recorder where it has one (the same expert, DART-perturbed, holding still after success:
    `world/contact_record.py`, `world/synth.py`), else `record_demos` through the env. Returns what it wrote."""
    if env_id in CONTACT_ENVS:
        from sensorvla.world.contact_record import generate_contact_dataset

        generate_contact_dataset(out, task=env_id, num_episodes=demos, seed=seed, image_size=image_size,
                                 progress=False)  # fmt: skip
        return {"dataset": str(out), "kept": demos, "recorder": "world.contact_record.generate_contact_dataset"}
    if env_id == "sensorvla/Insertion-v0":
        from sensorvla.world.synth import generate_dataset

        generate_dataset(out, num_episodes=demos, seed=seed, image_size=image_size, progress=False)
        return {"dataset": str(out), "kept": demos, "recorder": "world.synth.generate_dataset"}
    return {**record_demos(env_id, out, demos, image_size, seed), "recorder": "world.bench.record_demos"}


# --- measuring -----------------------------------------------------------------------------------------------
class Phases:
    """Wall and CPU-seconds (`runtime.cpu_seconds`: this process and its reaped children) per named phase."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """`fn()`, its wall and CPU-seconds added under `name`."""
        from sensorvla.runtime import cpu_seconds

        print(f"[bench] {name}", flush=True)
        t, c = time.perf_counter(), cpu_seconds()
        try:
            return fn()
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - c

    def table(self) -> list[str]:
        """Markdown rows: phase | wall s | CPU-s."""
        rows = ["| phase | wall (s) | CPU-seconds |", "|---|---|---|"]
        rows += [f"| {k} | {self.wall[k]:.1f} | {self.cpu[k]:.1f} |" for k in self.wall]
        rows.append(f"| total | {sum(self.wall.values()):.1f} | {sum(self.cpu.values()):.1f} |")
        return rows


# --- demos -> dataset ----------------------------------------------------------------------------------------
def expert_action(env) -> np.ndarray:
    """The env's scripted expert's next action (`unwrapped.expert_action()` or `unwrapped.sim.expert_action()`)."""
    u = env.unwrapped
    if hasattr(u, "expert_action"):
        return np.asarray(u.expert_action(), np.float32)
    sim = getattr(u, "sim", None)
    if sim is not None and hasattr(sim, "expert_action"):
        return np.asarray(sim.expert_action(), np.float32)
    raise ConfigError(f"{u.spec.id if u.spec else type(u).__name__} has no scripted expert (unwrapped.expert_action())")


def view_names(env, count: int) -> list[str]:
    """The env's view names (`unwrapped.views`), kept in the env's order once the dataset sorts them."""
    names = list(getattr(env.unwrapped, "views", ()) or ())
    if len(names) != count:
        names = [f"cam{i}" for i in range(count)]
    return names if names == sorted(names) else [f"{i}_{n}" for i, n in enumerate(names)]


def record_episode(env, seed: int, name: str):
    """One expert episode as `EpisodeData` (each observation's frames, state and new sensor rows), and its success."""
    from sensorvla.data.types import EpisodeData, Stream
    from sensorvla.eval.rollout_video import EpisodeRecorder

    obs, _ = env.reset(seed=seed)
    rec = EpisodeRecorder(view_names(env, len(obs["images"])))  # frames per view, times, new sensor rows, actions
    state, info, done = [], {}, False
    while not done:
        rec.observe(obs)
        state.append(np.asarray(obs["state"], np.float32))
        rec.act(expert_action(env))
        obs, _, terminated, truncated, info = env.step(rec.actions[-1])
        done = terminated or truncated
    t = np.asarray(rec.times, np.float64)
    streams = {"action": Stream(t, np.stack(rec.actions)), "state": Stream(t, np.stack(state))}
    streams.update({f"image.{view}": Stream(t, np.stack(frames)) for view, frames in rec.views.items()})
    sensor_t, sensor = rec.sensor()
    if sensor_t is not None:
        streams["sensor"] = Stream(sensor_t, sensor)
    episode = EpisodeData.from_streams(name, str(obs["instruction"]), streams, {"seed": seed})
    return episode, bool(info.get("success", False))


def record_demos(env_id: str, out: Path, demos: int, image_size: int, seed: int = 0) -> dict:
    """Record `demos` successful expert episodes (seeds seed, seed + 1, ...; at most 3x as many tried) as a
    LeRobot v3 dataset at `out`. Returns {"dataset", "tried", "kept", "expert_success_rate"}."""
    from sensorvla.data.writer import write_dataset

    env = make_env(env_id, image_size)
    kept, tried = [], 0
    while len(kept) < demos and tried < 3 * demos:
        episode, ok = record_episode(env, seed + tried, f"demo_{tried:04d}")
        tried += 1
        if ok:
            kept.append(episode)
    if len(kept) < demos:
        raise RuntimeError(f"the expert of {env_id} succeeded in {len(kept)} of {tried} episodes; {demos} needed")
    ts = np.concatenate([e.sensor_timestamps for e in kept if e.sensor_timestamps is not None] or [np.zeros(2)])
    rate = float(1 / np.median(np.diff(ts))) if len(ts) > 2 else 0.0
    fps = float(1 / np.median(np.diff(kept[0].action_timestamps)))
    write_dataset(
        kept,
        out,
        dataset_id=f"bench_{env_id.replace('/', '_')}_n{demos}_px{image_size}",
        action_fps=fps,
        overwrite=True,
        progress=False,
        extra_info={"sensor_rate": rate, "force_channels": int(getattr(env.unwrapped, "force_channels", 1))},
    )
    return {"dataset": str(out), "tried": tried, "kept": len(kept), "expert_success_rate": len(kept) / tried}


# --- training ------------------------------------------------------------------------------------------------
def recipe_config(stage: str, vl_dir: Path, data_dir: Path, out: Path, s: BenchSettings):
    """The `small-data-<stage>` preset with the bench's backbone, pixel bounds, data, budget and overrides."""
    from sensorvla.config import SensorVLAConfig
    from sensorvla.presets import apply_values, small_data_values

    values = {
        **small_data_values(stage),
        "model.backbone.vl_model": str(vl_dir),
        "model.backbone.min_pixels": s.pixels,
        "model.backbone.max_pixels": s.pixels,
        "data.dataset_dir": str(data_dir),
        "train.output_dir": str(out / stage),
        "train.progress": "off",
    }
    if stage == "stage1":
        values.update({"train.epochs": s.stage1_epochs, "train.use_cache": "always"})
    else:
        from sensorvla.training.checkpoint import BEST_NAME

        values.update(
            {
                "train.max_steps": s.stage2_steps,
                "train.stage1_checkpoint": str(out / "stage1" / "checkpoints" / BEST_NAME),
            }
        )
    return apply_values(SensorVLAConfig(), {**values, **s.train_overrides})


def train_recipe(vl_dir: Path, data_dir: Path, out: Path, s: BenchSettings, phases: Phases) -> dict:
    """The VL cache, stage 1 from it, stage 2 from stage 1 (each a phase); the stage summaries, the checkpoint and
    the backbone."""
    import copy

    from sensorvla.training.loop import train

    cfg1 = recipe_config("stage1", vl_dir, data_dir, out, s)
    cache = copy.deepcopy(cfg1)
    cache.train.mode = "cache"
    phases.run("cache", lambda: train(cache, progress=False))
    r1 = phases.run("stage1", lambda: train(cfg1, progress=False))
    cfg2 = recipe_config("stage2", vl_dir, data_dir, out, s)
    r2 = phases.run("stage2", lambda: train(cfg2, progress=False))
    return {
        "stage1": {"steps": r1["steps"], "best_val": r1["best_val"], "epochs": cfg1.train.epochs},
        "stage2": {"steps": r2["steps"], "best_val": r2["best_val"], "max_steps": cfg2.train.max_steps},
        "checkpoint": str(out / "stage2" / "checkpoints" / "pretrained_model"),
        "vl_model": str(vl_dir),
    }


def train_cnns(data_dir: Path, data_cfg, norm, s: BenchSettings, cpu_budget_s: float, phases: Phases) -> dict:
    """The CNN reference with and without the sensor, each for `cpu_budget_s` CPU-seconds: {row: (policy, info)}."""
    from sensorvla.eval.cnn_baseline import CNNBaselineConfig, train_cnn_baseline

    out = {}
    for row, use_sensor in zip(CNN_ROWS, (True, False), strict=True):
        cfg = CNNBaselineConfig(budget_s=0.0, cpu_budget_s=cpu_budget_s, max_steps=s.cnn_max_steps,
                                use_sensor=use_sensor)  # fmt: skip
        policy, info = phases.run(row, lambda c=cfg: train_cnn_baseline(data_dir, data_cfg, norm, c, progress=False))
        out[row] = (policy, {**info, "config": dataclasses.asdict(cfg)})
    return out


# --- closed loop ---------------------------------------------------------------------------------------------
def closed_loop_rows(runner, env_id: str, s: BenchSettings, out: Path) -> dict:
    """Our three rows: all modalities, sensor ablated, vision ablated (views blanked)."""
    kwargs = {"all": {}, "sensor_ablated": {"ablate_sensor": True}, "vision_ablated": {"ablate_vision": "blank"}}
    rows = {}
    for name in ROWS:
        rows[name] = one_row(runner, env_id, s, out, name, **kwargs[name])
    return rows


def one_row(runner, env_id: str, s: BenchSettings, out: Path, name: str, **kw) -> dict:
    """One closed-loop row over the seeded episodes; rollout videos (`s.videos` of them) under out/rollout/<row>/."""
    from sensorvla.eval.rollout import rollout

    video_dir = out / "rollout" / name if s.videos != "none" else None
    r = rollout(runner, make_env(env_id, s.image_size), episodes=s.episodes, execute_steps=s.execute_steps,
                seed=s.eval_seed, video_dir=video_dir, videos=s.videos, **kw)  # fmt: skip
    return {k: v for k, v in r.items() if k != "results"}


def expert_row(env_id: str, s: BenchSettings) -> dict:
    """The scripted expert over the same seeded episodes."""
    from sensorvla.eval.rollout import scripted_episodes, summarize

    env = make_env(env_id, s.image_size)
    results = scripted_episodes(env, lambda: expert_action(env), episodes=s.episodes, seed=s.eval_seed)
    return {**summarize(results), "episodes": s.episodes}


# --- the run -------------------------------------------------------------------------------------------------
def run_bench(out: Path, s: BenchSettings) -> dict:
    """Demos -> dataset -> our two stages -> the CNNs on the same CPU-seconds -> the closed-loop table. Writes
    out/bench.json and out/report.md, prints the table; returns the summary. `s.reuse` takes the dataset, our
    trained policy and its CPU-seconds from an earlier run in `out` (`reused_training`) and runs the rest."""
    from sensorvla.eval.cnn_baseline import CNNRunner, dataset_normalizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env_id, phases = s.env_id(), Phases()
    data_dir = out / "data"
    if s.reuse:
        demos, trained, ours_cpu, ours_wall = reused_training(out, s)
        vl_dir = Path(trained["vl_model"])
    else:
        vl_dir = Path(s.vl_model) if s.vl_model else phases.run("tiny_model", lambda: tiny_model(out, s))
        demos = phases.run("demos", lambda: record_task_demos(env_id, data_dir, s.demos, s.image_size))
        phases.run("stats", lambda: write_stats(data_dir, recipe_config("stage1", vl_dir, data_dir, out, s).data))
        trained = train_recipe(vl_dir, data_dir, out, s, phases)
        ours_cpu = sum(phases.cpu[k] for k in ("cache", "stage1", "stage2"))
        ours_wall = sum(phases.wall[k] for k in ("cache", "stage1", "stage2"))
    cnn_budget = s.cnn_cpu_s or ours_cpu
    data_cfg = recipe_config("stage1", vl_dir, data_dir, out, s).data
    norm = dataset_normalizer(data_dir, data_cfg)
    cnns = train_cnns(data_dir, data_cfg, norm, s, cnn_budget, phases) if s.cnn else {}
    runner = policy_runner(trained["checkpoint"], s)
    table = phases.run("closed_loop", lambda: closed_loop_rows(runner, env_id, s, out))
    for row, (policy, _) in cnns.items():
        cnn_runner = CNNRunner(policy, norm, data_cfg)
        table[row] = phases.run("closed_loop", lambda r=cnn_runner, n=row: one_row(r, env_id, s, out, n))
    table["expert"] = phases.run("closed_loop", lambda: expert_row(env_id, s))
    budget = {
        "ours": {"cpu_s": ours_cpu, "wall_s": ours_wall, "stage1_epochs": s.stage1_epochs,
                 "stage2_steps": s.stage2_steps, "reused": s.reuse},  # fmt: skip
        **{row: {"cpu_budget_s": info["config"]["cpu_budget_s"], "cpu_s": info["cpu_s"], "wall_s": info["wall_s"],
                 "steps": info["steps"], "max_steps": info["config"]["max_steps"]} for row, (_, info) in cnns.items()},
    }  # fmt: skip
    summary = {
        "task": s.task, "env_id": env_id, "settings": dataclasses.asdict(s), "demos": demos,
        "training": trained, "budget": budget, "closed_loop": table,
        "phases": {"wall_s": phases.wall, "cpu_s": phases.cpu},
    }  # fmt: skip
    write_outputs(out, summary, phases)
    return summary


def policy_runner(checkpoint: str | Path, s: BenchSettings):
    """Our trained policy behind a `PolicyRunner` in the bench's execution mode: fast-slow with the VL features
    recomputed every `s.vl_refresh_every` queries (counted, never aged out by the wall clock: a loaded machine must
    not change what the policy sees), the sensor encoder and head re-run on the newest sensor window every query."""
    from sensorvla.inference.runner import PolicyRunner

    return PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=s.vl_refresh_every, max_vl_age_s=float("inf"))


# the settings a reused training must share with the run that trained it
TRAINING_KEYS = ("task", "demos", "image_size", "patch_size", "pixels", "stage1_epochs", "stage2_steps", "vl_model",
                 "train_overrides")  # fmt: skip


def reused_training(out: Path, s: BenchSettings) -> tuple[dict, dict, float, float]:
    """(demos, training, our CPU-seconds, our wall seconds) of the earlier run in `out` (its bench.json), checked
    against `s`: ConfigError naming what is missing or differs, and how to train afresh."""
    path = out / "bench.json"
    if not path.is_file():
        raise ConfigError(f"--reuse: {path} does not exist; run `sensorvla bench sim` into {out} once without --reuse")
    prev = json.loads(path.read_text())
    now = dataclasses.asdict(s)
    differ = {k: (prev["settings"].get(k), now[k]) for k in TRAINING_KEYS if prev["settings"].get(k) != now[k]}
    if differ:
        said = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise ConfigError(f"--reuse: the run in {out} was trained with other settings ({said}); drop --reuse or use "
                          "another --out to train afresh")  # fmt: skip
    trained = prev["training"]
    if not (Path(trained["checkpoint"]) / "config.json").is_file():
        raise ConfigError(f"--reuse: the trained policy {trained['checkpoint']} is missing; drop --reuse to train it")
    trained.setdefault("vl_model", s.vl_model or str(out / f"tiny_qwen2_5_vl_p{s.patch_size}"))
    ours = prev["budget"]["ours"]
    return prev["demos"], trained, float(ours["cpu_s"]), float(ours["wall_s"])


def tiny_model(out: Path, s: BenchSettings) -> Path:
    """The tiny random Qwen2.5-VL with the bench's patch size and pixel bounds (built once per out folder)."""
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    vl_dir = out / f"tiny_qwen2_5_vl_p{s.patch_size}"
    if not (vl_dir / "config.json").exists():
        build_tiny_qwen_vl(vl_dir, patch_size=s.patch_size, min_pixels=s.pixels, max_pixels=s.pixels)
    return vl_dir


def write_stats(data_dir: Path, data_cfg) -> None:
    """The recipe split's norm stats into the dataset (as `sensorvla stats`): both stages and the CNNs read them."""
    import dataclasses

    from sensorvla.data.normalize import compute_stats
    from sensorvla.training.data_setup import stats_path

    compute_stats(data_dir, progress=False, data_cfg=dataclasses.replace(data_cfg, dataset_dir=str(data_dir))).save(
        stats_path(data_dir)
    )


# --- output --------------------------------------------------------------------------------------------------
LABELS = {
    "all": "ours, all modalities",
    "sensor_ablated": "ours, sensor ablated",
    "vision_ablated": "ours, vision ablated (views blanked)",
    "cnn_with_sensor": "plain CNN, with the sensor",
    "cnn_without_sensor": "plain CNN, without the sensor",
    "expert": "scripted expert",
}


def seconds(v: float) -> str:
    """Seconds for the table: whole above 10, one decimal below."""
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def execution(s: dict) -> str:
    """How the closed loop executed the policies, in words (from the settings dict)."""
    n, k = s["execute_steps"], s.get("vl_refresh_every", 1)
    what = "re-planned every control step" if n == 1 else f"chunks of {n} executed"
    return what + (f", VL features refreshed every {k} queries" if k > 1 else "")


def format_table(summary: dict) -> str:
    """The closed-loop table (success per row, the training budget beside each policy) as markdown."""
    t, b, s = summary["closed_loop"], summary["budget"], summary["settings"]
    lines = [
        f"sensorvla bench sim: {summary['env_id']}, {s['demos']} demos, {s['episodes']} seeded episodes per row, "
        f"{execution(s)}" + (" (training reused)" if s.get("reuse") else ""),
        "",
        "| policy | success | lateral ok (seeing) | depth ok (touch) | training CPU-seconds | training wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row, label in LABELS.items():
        if row not in t:
            continue
        r = t[row]
        budget = b.get("ours" if row in ROWS else row)
        cpu = seconds(budget["cpu_s"]) if budget else "–"
        wall = seconds(budget["wall_s"]) if budget else "–"
        won = round(r["success_rate"] * r["episodes"])
        parts = [f"{won} / {r['episodes']} ({100 * r['success_rate']:.0f} %)"]
        parts += [f"{100 * r[k]:.0f} %" if r.get(k) is not None else "–" for k in ("lateral_ok_rate", "depth_ok_rate")]
        lines.append(f"| {label} | {' | '.join(parts)} | {cpu} | {wall} |")
    return "\n".join(lines)


def write_outputs(out: Path, summary: dict, phases: Phases) -> None:
    """Print the table and where the time went; write bench.json and report.md."""
    from sensorvla.io import atomic_write_bytes, atomic_write_json

    table = format_table(summary)
    b = summary["budget"]
    budget_line = "; ".join(
        [f"Budget: ours {b['ours']['cpu_s']:.0f} CPU-s ({b['ours']['wall_s']:.0f} s wall: cache + "
         f"{b['ours']['stage1_epochs']} stage-1 epochs + {b['ours']['stage2_steps']} stage-2 steps)"]
        + [f"{row} {b[row]['cpu_budget_s']:.0f} CPU-s budget ({b[row]['cpu_s']:.0f} used, "
                    f"{b[row]['wall_s']:.0f} s wall, {b[row]['steps']} steps)" for row in CNN_ROWS if row in b]
    )  # fmt: skip
    report = ["# sensorvla bench sim", "", table, "", budget_line, "", "## Where the time went", "", *phases.table()]
    atomic_write_bytes(out / "report.md", ("\n".join(report) + "\n").encode())
    atomic_write_json(out / "bench.json", json.loads(json.dumps(summary, default=float)))
    print(table)
    print(budget_line)
    print("\n".join(phases.table()))
    print(f"[bench] report: {out / 'report.md'}")
