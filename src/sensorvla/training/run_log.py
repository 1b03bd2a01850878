"""Rank-0 run logging: stdout, `metrics.jsonl`, TensorBoard (default) and optional Weights & Biases; at the end
of a run, `training_curves.png` (train and validation loss, learning rate per group) drawn from metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger("sensorvla.train")
CURVES_NAME = "training_curves.png"
CURVE_KEYS = ("loss", "val_loss", "loss_wrench", "val_loss_wrench")  # + "lr/<group>"; the wrench output's own


class RunLogger:
    """Writes one JSON line per event to <run_dir>/metrics.jsonl and mirrors scalars to TensorBoard/W&B.

    On ranks other than 0 every method is a no-op.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, wandb: bool, config: dict):
        self.enabled, self.run_dir = enabled, run_dir
        self._tb = self._wandb = None
        self._file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is in the [train] extra; keep training without it
                logger.warning("tensorboard not installed; logging to metrics.jsonl only")
        if wandb:
            import wandb as wb  # offline mode: WANDB_MODE=offline

            self._wandb = wb.init(project="sensorvla", config=config, dir=str(run_dir))

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Append one metrics record (kind, step, values) to metrics.jsonl and the enabled loggers."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}
        self._file.write(json.dumps({"kind": kind, "step": step, **clean}) + "\n")
        for k, v in clean.items():
            if isinstance(v, float) and math.isfinite(v) and self._tb is not None:
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in clean.items()}, step=step)

    def close(self) -> None:
        """Close metrics.jsonl and the loggers; draw training_curves.png."""
        if self._file is not None:
            self._file.close()
            self._file = None
            try:
                plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / CURVES_NAME)
            except Exception as e:  # a figure must never fail a finished run
                logger.warning("could not draw %s (%s: %s)", CURVES_NAME, type(e).__name__, e)
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_curves(metrics_path: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl -> {"loss": {step: value}, "val_loss": {...}, "lr/<group>": {...}} (and the wrench output's
    "loss_wrench", "val_loss_wrench" when the run has one); a step logged twice
    (a run restarted in the same folder) keeps its latest value."""
    curves: dict[str, dict[int, float]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        if row.get("kind") not in ("train", "val"):
            continue
        for key, value in row.items():
            if (key in CURVE_KEYS or key.startswith("lr/")) and isinstance(value, (int, float)):
                curves.setdefault(key, {})[int(row["step"])] = float(value)
    return curves


def plot_training_curves(metrics_path: Path, path: Path) -> Path | None:
    """Draw the run's curves from its metrics.jsonl: the training loss per step (and a moving average), the
    validation loss, the wrench output's losses when the run has one, and the learning rate of each parameter group.
    None when nothing was logged."""
    curves = read_curves(metrics_path)
    if not curves.get("loss"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sensorvla.io import atomic_write_bytes

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, loss = map(np.asarray, zip(*sorted(curves["loss"].items())))
    window = max(1, len(loss) // 50)
    ax_loss.plot(steps, loss, color="C0", alpha=0.3 if window > 1 else 1.0, lw=0.8, label="train (per step)")
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1 :], smooth, color="C0", lw=1.5, label=f"train ({window}-step mean)")
    if curves.get("val_loss"):
        vs, vl = zip(*sorted(curves["val_loss"].items()))
        ax_loss.plot(vs, vl, "o-", color="C3", lw=1.5, ms=4, label="validation")
    for key, style, label in (("loss_wrench", "--", "wrench (train)"), ("val_loss_wrench", "s--", "wrench (val)")):
        if curves.get(key):  # the wrench output's loss (unweighted), beside the total
            ws, wl = zip(*sorted(curves[key].items()))
            ax_loss.plot(ws, wl, style, color="C2", lw=1.2, ms=3, label=label)
    if np.all(loss > 0):
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_loss.legend(fontsize=8)
    groups = sorted(k for k in curves if k.startswith("lr/"))
    for k, name in enumerate(groups):
        s, v = zip(*sorted(curves[name].items()))
        marker = "o" if len(s) <= 30 else None  # logged every --train.log-every-steps steps
        ax_lr.plot(s, v, lw=1.5, ls=("-", "--", ":", "-.")[k % 4], marker=marker, ms=3, label=name.removeprefix("lr/"))
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate per parameter group")
    points = max((len(curves[g]) for g in groups), default=0)
    if 0 < points < 10:  # logged with the full rows only: say so rather than imply a straight schedule
        ax_lr.text(0.02, 0.02, f"{points} logged points (--train.log-every-steps)", transform=ax_lr.transAxes,
                   fontsize=8, color="0.4")  # fmt: skip
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if groups:
        ax_lr.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
