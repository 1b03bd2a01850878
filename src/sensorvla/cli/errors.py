"""The errors every subcommand reports as one line (their message already says what to do)."""

from __future__ import annotations


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what to do: printed without a traceback (exit code 1)."""
    from sensorvla.config import ConfigError
    from sensorvla.data.normalize import NormalizationError
    from sensorvla.data.types import DataError
    from sensorvla.models.backbone import BackboneLoadError
    from sensorvla.models.finetune import FinetuneError
    from sensorvla.models.folder import CheckpointMismatchError
    from sensorvla.training.checkpoint import CheckpointWriteError
    from sensorvla.training.feature_cache import StaleCacheError
    from sensorvla.training.loop import TrainingDivergedError

    return (
        ConfigError,  # e.g. a resume that would reinterpret the saved run
        CheckpointMismatchError,
        StaleCacheError,
        NormalizationError,
        DataError,
        FinetuneError,
        TrainingDivergedError,
        CheckpointWriteError,  # e.g. a full disk
        BackboneLoadError,
        FileNotFoundError,
        FileExistsError,
    )


KNOWN_ERRORS = known_errors  # the old name (`sensorvla.cli.KNOWN_ERRORS()`)
