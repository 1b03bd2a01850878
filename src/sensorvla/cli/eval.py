"""`sensorvla eval` and `sensorvla rollout`: offline metrics and closed-loop rollouts of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


def evaluate(
    checkpoint: Path,
    dataset: Path,
    split: Literal["train", "val", "test", "all"] = "test",
    out: Path = Path("eval_out"),
    batch_size: int = 16,
    max_samples: int | None = None,
) -> int:
    """Offline metrics on held-out episodes, sensor ablation, plots and a report page.

    Args:
        checkpoint: a pretrained_model folder, or a hub id `org/name[@revision]` in the local hub cache.
        dataset: a dataset folder, or a hub id `org/name[@revision]` in the local hub cache.
    """
    from sensorvla import hub
    from sensorvla.eval.offline import evaluate as run

    checkpoint = hub.resolve(checkpoint, repo_type="model").path
    dataset = hub.resolve(dataset, repo_type="dataset").path
    metrics = run(checkpoint, dataset, split=split, out_dir=out, batch_size=batch_size, max_samples=max_samples)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=2))
    print(f"report: {out / 'report.md'}")
    return 0


def rollout(
    checkpoint: Path,
    env: str = "sensorvla/Insertion-v0",
    episodes: int = 10,
    execute_steps: int = 1,
    ablate: bool = True,
    out: Path = Path("rollout_out"),
    seed: int = 0,
    videos: Literal["some", "all", "none"] = "some",
    ablate_stream: tuple[str, ...] = (),
    vl_refresh_every: int = 1,
) -> int:
    """Closed-loop rollouts of a checkpoint in a Gymnasium environment (chunked execution). With `--ablate`
    (the default) it also runs the sensor-ablated and the vision-ablated (blanked and shuffled views) rows
    and prints one table: all / sensor ablated / vision ablated. Writes OUT/rollout.json, OUT/report.md and
    mp4 videos (views, sensor trace, action, outcome): `--videos some` the first success and the first failure
    with all inputs and the first failure with the sensor ablated; `all` every episode of every row.
    `--ablate-stream NAME ...` (space- or comma-separated: `imu tactile` or `imu,tactile`) adds a row per named
    stream with that stream alone ablated: a declared stream's name, or `sensor` for the dataset's sensor tensor
    (the checkpoint's names are listed on a wrong one).
    `--execute-steps N` executes N actions of each chunk before re-querying (1, the default: re-plan every control
    step, so a contact is answered at the next step); `--vl-refresh-every K` (fast-slow) recomputes the VL features
    every K policy queries and re-runs only the sensor encoder and head on the newest sensor window in between."""
    import gymnasium as gym

    from sensorvla.eval.rollout import rollout as run
    from sensorvla.eval.rollout import rollout_table
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.io import atomic_write_bytes, atomic_write_json
    from sensorvla.world.envs import register_envs

    register_envs()
    # VL refreshes counted in queries, never aged out by the wall clock (a loaded machine must not change the result)
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=vl_refresh_every, max_vl_age_s=float("inf"))
    stream_rows = stream_ablation_rows(runner, ablate_stream)
    some = videos == "some"
    rows = {"all": {"videos": "outcomes" if some else videos}}
    if ablate:
        rows.update(
            sensor_ablated={"ablate_sensor": True, "videos": "failure" if some else videos},
            vision_ablated={"ablate_vision": "blank", "videos": "none" if some else videos},
            vision_shuffled={"ablate_vision": "shuffled", "videos": "none" if some else videos},
        )
    rows.update({name: dict(kw, videos="none" if some else videos) for name, kw in stream_rows.items()})
    result = {
        name: run(runner, gym.make(env), episodes=episodes, execute_steps=execute_steps, seed=seed, video_dir=out, **kw)
        for name, kw in rows.items()
    }
    atomic_write_json(out / "rollout.json", json.loads(json.dumps(result, default=float)))
    table = rollout_table(result)
    links = [
        f"- [{name.replace('_', ' ')}, episode {v['episode']}: {'success' if v['success'] else 'failure'}]"
        f"({Path(v['path']).name})"
        for name, r in result.items()
        for v in r["videos"]
    ]
    report = [f"# Rollouts of `{checkpoint}` in {env}, {episodes} episodes per row", "", table, ""]
    report += ["## Videos", "", *(links or ["(none: --videos none)"]), ""]
    atomic_write_bytes(out / "report.md", "\n".join(report).encode())
    print(table)
    print(f"report: {out / 'report.md'}")
    return 0


def stream_ablation_rows(runner, names: tuple[str, ...]) -> dict[str, dict]:
    """`--ablate-stream` values (repeated or comma-separated) -> the rollout rows `<name>_ablated` with that stream
    alone ablated; ConfigError naming the checkpoint's streams for a name it does not have."""
    from sensorvla.config import ConfigError

    known = [s.name for s in runner.streams]
    if runner.cfg.model.sensor.enabled and runner.cfg.model.sensor.channels:
        known = ["sensor", *known]  # the dataset's sensor tensor (its legacy force/A-scan streams together)
    wanted = [n.strip() for value in names for n in str(value).split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigError(
            f"--ablate-stream {', '.join(unknown)}: the checkpoint has no such stream; its streams are {known}"
        )
    return {f"{n}_ablated": {"ablate_sensor": n} for n in dict.fromkeys(wanted)}


def register(app) -> None:
    """Add `eval` and `rollout` to the `sensorvla` app."""
    app.command(evaluate, name="eval")
    app.command(rollout, name="rollout")
