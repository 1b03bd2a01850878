"""The options of the data layer's entry points, as plain dataclasses: the keywords of the importers
(`import_hdf5`, `import_recorder`) and of `add_sensor`, and the flags of `sensorvla data import-*|add-sensor`.

No heavy import here (no numpy): the command line builds its flags from these at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

ImageSize = int | tuple[int, int] | None  # a square side N, or (h, w); None keeps the stored size


@dataclass
class ImportOptions:
    """What every importer takes besides its source (and `dataset_id`, `progress`): see `importers.base.run_import`."""

    instruction: str | None = None  # one instruction for every episode
    image_size: ImageSize = None  # resize frames to N x N (or H W) (default: the stored size)
    min_actions: int = 8  # episodes with fewer action frames are an error (the training horizon)
    views: Sequence[str] | None = None  # import only these views (default: all; every episode must have them)
    overwrite: bool = False
    # video: LeRobot video features (mp4); npy: lossless raw frames (not LeRobot-visible)
    image_format: Literal["video", "npy"] = "video"


@dataclass
class AttachOptions:
    """How `attach.add_sensor` attaches a sensor file to a dataset."""

    clock_offset: float = 0.0  # seconds added to the sensor's timestamps to reach the dataset's clock
    name: str = "sensor"  # the stream's name in meta/info.json
    rate: float | None = None  # the sensor's rate in Hz; None: measured from the timestamps
    force_channels: int | None = None  # how many leading channels are force; None: all of them
    # the encoder kind (wrench, profile1d, taxel2d, imu, generic): training reads the stream as a declared stream of
    # its own (`--data.streams`) instead of as the sensor tensor; None: not declared
    encoder: str | None = None
    episode: int | None = None  # the dataset episode of a file without episode indices
    overwrite: bool = False  # replace a stream of the same name
