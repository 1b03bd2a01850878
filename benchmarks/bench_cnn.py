"""The plain CNN behaviour-cloning reference on the demo's task, for a wall-clock budget.

Per-camera convs + spatial softmax, state, the sensor window, random-shift augmentation and the same action
chunking as the VLA (`sensorvla.eval.cnn_baseline`), trained on the demo's synthetic dataset for
`--budget-s` seconds, then rolled out in `sensorvla/Insertion-v0` (20 seeded episodes, the demo's seeds).
`sensorvla demo` trains the same reference with its own training time as the budget and prints it beside
the VLA; this entry runs it alone, e.g. to see how success grows with the budget.

Run: `python benchmarks/run.py cnn [budget_s ...]` (default 60 120 240).
"""

from __future__ import annotations

from pathlib import Path

from _scratch import scratch_dir


def run(budgets: tuple[float, ...] = (60.0, 120.0, 240.0), episodes: int = 300, rollouts: int = 20) -> list[dict]:
    from sensorvla.data.normalize import compute_stats
    from sensorvla.demo import DemoSettings, base_config, cnn_reference
    from sensorvla.runtime import configure_threads
    from sensorvla.training.data_setup import stats_path
    from sensorvla.world.synth import generate_dataset

    threads = configure_threads()
    root = Path(scratch_dir("bench_cnn_"))
    s = DemoSettings(episodes=episodes)
    data = generate_dataset(root / "data", num_episodes=s.episodes, seed=0, image_size=s.image_size, progress=False)
    compute_stats(data).save(stats_path(data))
    data_cfg = base_config(root, data, root, "regression", s).data  # the demo's data settings (window, grid)
    rows = []
    for budget in budgets:
        r = cnn_reference(data, budget, rollouts, data_cfg)
        rows.append({"budget_s": budget, "threads": threads, **{k: v for k, v in r.items() if k != "training"},
                     "steps": r["training"]["steps"]})  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| budget (s) | steps | success | lateral within tolerance | threads |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['budget_s']:.0f} | {r['steps']} | {100 * r['success_rate']:.0f} % | "
            f"{100 * (r['lateral_ok_rate'] or 0):.0f} % | {r['threads']} |"
        )
    return "\n".join(lines)
