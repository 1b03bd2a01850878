"""Rank-0 run logging: stdout, `metrics.jsonl`, TensorBoard (default) and optional Weights & Biases."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger("sensorvla.train")


class RunLogger:
    """Writes one JSON line per event to <run_dir>/metrics.jsonl and mirrors scalars to TensorBoard/W&B.

    On ranks other than 0 every method is a no-op.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, wandb: bool, config: dict):
        self.enabled = enabled
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
        """Close metrics.jsonl and the loggers."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
