"""Evaluation figures (matplotlib, Agg): trajectories, error per horizon step, sensor-ablation bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dimension_kinds(gt: np.ndarray, rtol: float = 1e-6) -> list[str]:
    """Per action dimension of ground-truth actions `gt` (..., D): "constant" (one value up to `rtol` of the
    largest magnitude of any dimension), "binary" (two values, e.g. a gripper or tool flag) or "continuous"."""
    flat = np.asarray(gt, np.float64).reshape(-1, np.shape(gt)[-1])
    scale = max(float(np.abs(flat).max()) if flat.size else 0.0, 1e-12)
    kinds = []
    for d in range(flat.shape[1]):
        col = flat[:, d]
        if col.size == 0 or np.ptp(col) <= rtol * scale:
            kinds.append("constant")
        elif len(np.unique(col)) == 2:
            kinds.append("binary")
        else:
            kinds.append("continuous")
    return kinds


def trajectories(raws: list[dict], pred: np.ndarray, names: list[str], path: Path, max_episodes: int = 3) -> Path:
    """Predicted vs ground-truth first action of each chunk over time, per dimension, for a few episodes.

    Dimensions constant in the ground truth of the evaluated samples (e.g. rotations the task never uses)
    get no panel (autoscaled, they would show float noise as large swings); a note under the figure names
    them with the largest predicted magnitude. Binary dimensions (a tool flag) are drawn as steps on a fixed
    0..1 scale with the 0.5 threshold."""
    plt = pyplot()
    episodes = sorted({r["episode_index"] for r in raws})[:max_episodes]
    kinds = dimension_kinds(np.stack([r["actions"] for r in raws]))
    shown = [d for d, k in enumerate(kinds) if k != "constant"] or list(range(len(names)))
    dropped = [d for d in range(len(names)) if d not in shown]
    rows = len(shown)
    fig, axes = plt.subplots(rows, len(episodes), figsize=(4 * len(episodes), 1.5 * rows + 0.6), squeeze=False)
    for c, e in enumerate(episodes):
        idx = [i for i, r in enumerate(raws) if r["episode_index"] == e]
        t = [raws[i]["timestamp"] for i in idx]
        for row, d in enumerate(shown):
            ax = axes[row][c]
            gt = [raws[i]["actions"][0, d] for i in idx]
            if kinds[d] == "binary":
                lo, hi = float(min(np.min(gt), 0.0)), float(max(np.max(gt), 1.0))
                ax.step(t, gt, "k-", where="post", lw=1.2, label="ground truth")
                ax.step(t, pred[idx, 0, d], "C1--", where="post", lw=1.2, label="predicted")
                ax.axhline((lo + hi) / 2, color="0.6", lw=0.8, ls=":")
                ax.set_ylim(lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo))
                ax.set_yticks([lo, hi])
            else:
                ax.plot(t, gt, "k-", lw=1.2, label="ground truth")
                ax.plot(t, pred[idx, 0, d], "C1--", lw=1.2, label="predicted")
            if c == 0:
                ax.set_ylabel(names[d], fontsize=8)
            ax.tick_params(labelsize=7)
            if row < rows - 1:
                ax.tick_params(labelbottom=False)
        sensor = "sensor" if raws[idx[0]]["has_sensor"] else "no sensor"
        axes[0][c].set_title(f"episode {e} ({sensor})", fontsize=9)
        axes[-1][c].set_xlabel("time (s)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.3 / (1.5 * rows + 0.6) if dropped else 0, 1, 1))
    if dropped:
        peak = float(np.abs(pred[..., dropped]).max()) if pred.size else 0.0
        value = float(raws[0]["actions"][0, dropped[0]])
        fig.text(0.01, 0.01, f"not shown: {', '.join(names[d] for d in dropped)}, constant in the ground truth "
                 f"({value:.3g}); the largest predicted |value| of these is {peak:.2g}", fontsize=8)  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_per_step(metrics: dict[str, Any], names: list[str], path: Path) -> Path:
    """L1 error per horizon step, one line per action dimension."""
    plt = pyplot()
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
    """L1 with normal inputs, the sensor ablated (missing / shuffled) and the views ablated (blank / shuffled).

    The sensor group is measured on the samples with sensor data and the camera group on every sample, so
    their "normal" bars are the same predictions averaged over two sets: each bar names its set, and a
    note says so when the two differ."""
    plt = pyplot()
    n_sensor, n_all = metrics["with_sensor"]["num_samples"], metrics["num_samples"]
    groups = [
        (
            "sensor",
            metrics["with_sensor"]["l1"],
            metrics.get("ablation", {}),
            f"the {n_sensor} samples with sensor data",
        )
    ]
    groups.append(("cameras", metrics["l1"], metrics.get("vision_ablation", {}), f"all {n_all} samples"))
    groups = [g for g in groups if g[2]]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.4 * len(groups), 3.6), squeeze=False, sharey=True)
    for ax, (name, normal, modes, samples) in zip(axes[0], groups):
        labels = ["normal"] + list(modes)
        values = [normal] + [a["l1"] for a in modes.values()]
        bars = ax.bar(labels, values, color=["C2", "C3", "C1"][: len(values)])
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("L1 error (physical units)")
        ax.set_xlabel(f"{name} input: {samples}", fontsize=8)
        ax.set_title(f"does the policy use the {name}?", fontsize=10)
        ax.margins(y=0.12)
    both = len(groups) == 2 and n_sensor != n_all
    fig.tight_layout(rect=(0, 0.08 if both else 0, 1, 1))
    if both:
        fig.text(0.01, 0.015, f"The two normal bars are one prediction pass averaged over different samples: the "
                 f"{n_sensor} with sensor data (left) and all {n_all} (right).", fontsize=8)  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
