"""Evaluation figures (matplotlib, Agg): trajectories, error per horizon step, sensor-ablation bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trajectories(raws: list[dict], pred: np.ndarray, names: list[str], path: Path, max_episodes: int = 3) -> Path:
    """Predicted vs ground-truth first action of each chunk over time, per dimension, for a few episodes."""
    plt = _plt()
    episodes = sorted({r["episode_index"] for r in raws})[:max_episodes]
    dims = len(names)
    fig, axes = plt.subplots(dims, len(episodes), figsize=(4 * len(episodes), 1.6 * dims), squeeze=False, sharex="col")
    for c, e in enumerate(episodes):
        idx = [i for i, r in enumerate(raws) if r["episode_index"] == e]
        t = [raws[i]["timestamp"] for i in idx]
        for d in range(dims):
            ax = axes[d][c]
            ax.plot(t, [raws[i]["actions"][0, d] for i in idx], "k-", lw=1.2, label="ground truth")
            ax.plot(t, pred[idx, 0, d], "C1--", lw=1.2, label="predicted")
            if c == 0:
                ax.set_ylabel(names[d], fontsize=8)
            ax.tick_params(labelsize=7)
        sensor = "sensor" if raws[idx[0]]["has_sensor"] else "no sensor"
        axes[0][c].set_title(f"episode {e} ({sensor})", fontsize=9)
        axes[-1][c].set_xlabel("time (s)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_per_step(metrics: dict[str, Any], names: list[str], path: Path) -> Path:
    """L1 error per horizon step, one line per action dimension."""
    plt = _plt()
    arr = np.asarray(metrics["l1_per_step_dim"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d, name in enumerate(names):
        ax.plot(np.arange(1, arr.shape[0] + 1), arr[:, d], marker="o", ms=3, label=name)
    ax.set_xlabel("horizon step")
    ax.set_ylabel("L1 error (physical units)")
    ax.set_title("error per horizon step")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_bars(metrics: dict[str, Any], path: Path) -> Path:
    """L1 with normal inputs, the sensor ablated (missing / shuffled; samples with sensor data) and the views
    ablated (blank / shuffled; every sample)."""
    plt = _plt()
    groups = [("sensor", metrics["with_sensor"]["l1"], metrics.get("ablation", {}))]
    groups.append(("vision", metrics["l1"], metrics.get("vision_ablation", {})))
    groups = [g for g in groups if g[2]]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, (name, normal, modes) in zip(axes[0], groups):
        labels = ["normal"] + [f"{name} {m}" for m in modes]
        values = [normal] + [a["l1"] for a in modes.values()]
        bars = ax.bar(labels, values, color=["C2", "C3", "C1"][: len(values)])
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("L1 error")
        ax.set_title(f"does the policy use the {'sensor' if name == 'sensor' else 'cameras'}?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
