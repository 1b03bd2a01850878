"""The `sensorvla` command line: one module per command group and one tyro dispatcher (`cli.app`).

The names below are the package's public surface (`from sensorvla.cli import main, parse_train_config`).
"""

from sensorvla.cli.app import main
from sensorvla.cli.errors import KNOWN_ERRORS, known_errors
from sensorvla.cli.train import (
    SEED_ALIASES,
    VL_MODEL_ENV,
    parse_train_config,
    rewrite_seed_flags,
)

__all__ = [
    "KNOWN_ERRORS",
    "SEED_ALIASES",
    "VL_MODEL_ENV",
    "known_errors",
    "main",
    "parse_train_config",
    "rewrite_seed_flags",
]
