"""`sensorvla train` and the seed-guide scripts: seed flag spellings, the resume default, one call to `train`.

`sensorvla train` takes dotted overrides of `SensorVLAConfig` (tyro), e.g. `--model.head.type diffusion`,
and also every flag spelling of the seed guide (`--training-stage`, `--grad_accum`, `--batch_size`, ...),
which `SEED_ALIASES` (in `sensorvla.config`) rewrites to the dotted form. Environment variables are read here.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import tyro

from sensorvla.cli.errors import known_errors
from sensorvla.config import SEED_ALIASES, ConfigError, SensorVLAConfig, resolve_stage_defaults

__all__ = [
    "SEED_ALIASES",
    "VL_MODEL_ENV",
    "base_train_config",
    "parse_train_config",
    "rewrite_seed_flags",
    "run_train",
    "train_command",
]

VL_MODEL_ENV = "SENSORVLA_VL_MODEL"  # default backbone, e.g. a local tiny model for offline runs
# The config as a subcommand's only argument, without a prefix: its flags stay `--model.head.type`, ...
TrainFlags = Annotated[SensorVLAConfig, tyro.conf.arg(name="")]


def rewrite_seed_flags(argv: list[str]) -> list[str]:
    """Translate seed-guide spellings into dotted flags; underscores in flag names become hyphens."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            name = "--" + name[2:].replace("_", "-")
            name = SEED_ALIASES.get(name, name)
            arg = f"{name}{eq}{value}"
        out.append(arg)
    return out


def base_train_config(default_head: str = "regression", preset: str | None = None) -> SensorVLAConfig:
    """The defaults the train flags override: the given head, the backbone from `$SENSORVLA_VL_MODEL`, then the
    named preset (`--preset NAME`, sensorvla/presets.py) when one is given."""
    from sensorvla.presets import apply_preset

    cfg = SensorVLAConfig()
    cfg.model.head.type = default_head
    if os.environ.get(VL_MODEL_ENV):
        cfg.model.backbone.vl_model = os.environ[VL_MODEL_ENV]
    if preset:
        apply_preset(cfg, preset)  # the flags override it
    return cfg


def split_train_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Train flags (seed or dotted spellings) -> (the `--preset` name or None, the dotted flags)."""
    from sensorvla.presets import pop_preset

    return pop_preset(rewrite_seed_flags(argv))


def train_help(cfg: SensorVLAConfig) -> str:
    """The `sensorvla train --help` description: the seed spellings, the default backbone, the resume rule."""
    from sensorvla.presets import preset_help

    aliases = ", ".join(sorted(SEED_ALIASES))
    return (
        "Train stage 1 / stage 2 with one loop. Seed-guide flags are accepted too "
        f"(with - or _): {aliases}. Default backbone: ${VL_MODEL_ENV} or {cfg.model.backbone.vl_model}. "
        "With --resume, the saved run's config is the default. --preset NAME starts from a named config "
        f"({preset_help()})."
    )


def saved_run_config(cfg: SensorVLAConfig) -> SensorVLAConfig | None:
    """With `--resume`, the saved run's config (`<output_dir>/checkpoints/last/config.json`), else None."""
    if not cfg.train.resume:
        return None
    from sensorvla.training.checkpoint import load_run_config

    return load_run_config(cfg.train.output_dir)


def parse_train_config(argv: list[str], default_head: str = "regression") -> SensorVLAConfig:
    """argv (seed or dotted flags) -> SensorVLAConfig with the seed's stage defaults applied.

    With `--resume`, the saved run's config (`<output_dir>/checkpoints/last/config.json`) is the default
    that the given flags override, so a resumed run changes only what the command line names.
    """
    preset, args = split_train_args(argv)
    base = base_train_config(default_head, preset)

    def parse(default: SensorVLAConfig) -> SensorVLAConfig:
        return tyro.cli(
            SensorVLAConfig, args=args, default=default, prog="sensorvla train", description=train_help(base)
        )

    parsed = parse(base)
    saved = saved_run_config(parsed)
    return resolve_stage_defaults(parse(saved) if saved is not None else parsed)


def run_train(cfg: SensorVLAConfig, reference: SensorVLAConfig | None = None) -> int:
    """Validate `cfg` and train it: 0 on success, 2 for a bad config, 1 for a known error (message, no traceback).
    The run's log names the values that differ from `reference` (the command's preset or defaults)."""
    try:
        cfg.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sensorvla.training.loop import train

    try:
        train(cfg, reference=reference)  # logs the stage warnings (config.stage_warnings) itself, for Python too
    except known_errors() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def over_saved_run(cfg: SensorVLAConfig, reparse, run) -> int:
    """`run(cfg)` with the stage defaults applied; with `--resume`, `reparse(saved config)` (2 if unreadable)."""
    try:
        saved = saved_run_config(cfg) if reparse else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return reparse(saved) if saved is not None else run(resolve_stage_defaults(cfg))


def train_command(default: SensorVLAConfig, reparse):
    """The `sensorvla train` subcommand over `default`; `reparse(saved)` re-reads the flags over a saved run."""

    def train(cfg: TrainFlags = default) -> int:
        return over_saved_run(cfg, reparse, lambda c: run_train(c, reference=default))

    train.__doc__ = train_help(default)
    return train
