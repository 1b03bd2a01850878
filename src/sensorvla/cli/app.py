"""The `sensorvla` dispatcher: one tyro `SubcommandApp` over the command groups (train, data, eval, serve, export,
bench, plan, demo); each leaf parses typed arguments and calls one library function."""

from __future__ import annotations

import logging
import os
import sys

from tyro.extras import SubcommandApp

from sensorvla.cli import bench, data, demo, export, plan, serve, train
from sensorvla.cli import eval as evaluation
from sensorvla.cli.errors import known_errors
from sensorvla.config import ConfigError, SensorVLAConfig

DESCRIPTION = "Train, evaluate and serve sensor-augmented vision-language-action policies."
SEED_FLAG_COMMANDS = ("train", "plan")  # they take the seed-guide spellings of the train flags


def build_app(args: list[str], train_default: SensorVLAConfig, resumed: bool = False) -> SubcommandApp:
    """The command tree; `train` and `plan` parse their flags over `train_default` (a saved run's config on
    `--resume`, after which `resumed` stops a second look-up)."""

    def reparse(saved: SensorVLAConfig) -> int:
        return dispatch(args, saved, resumed=True)

    again = None if resumed else reparse
    app = SubcommandApp()
    app.command(train.train_command(train_default, again), name="train")
    app.command(plan.plan_command(train_default, again), name="plan")
    for group in (demo, data, serve, export, evaluation, bench):
        group.register(app)
    return app


def dispatch(args: list[str], train_default: SensorVLAConfig, resumed: bool = False) -> int:
    """Parse `args` with the command tree and run the chosen command; its exit code."""
    result = build_app(args, train_default, resumed).cli(args=args, prog="sensorvla", description=DESCRIPTION)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None, default_head: str = "regression") -> int:
    """`sensorvla <command> [flags]`: the exit code (2 for a bad flag, 1 for a known error, its message printed).
    `default_head`: the head type `train` and `plan` start from (`python -m sensorvla.train_diffusion`)."""
    from sensorvla.progress import quiet_library_bars
    from sensorvla.runtime import configure_threads

    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # train and plan: seed spellings rewritten, `--preset NAME` taken out as the default's base
        seeded = args[0] in SEED_FLAG_COMMANDS
        preset, rest = train.split_train_args(args[1:]) if seeded else (None, args[1:])
        default = train.base_train_config(default_head, preset)
    except ConfigError as e:  # an unknown --preset, or one without a name
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = [args[0], *rest]
    if args[0] not in {"-h", "--help"}:
        configure_threads()
        quiet_library_bars()  # no `\r` bars of transformers / huggingface_hub in a redirected log
    try:
        return dispatch(args, default)
    except SystemExit as e:  # tyro: --help (0) or a flag it cannot parse (2, message printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except known_errors() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
