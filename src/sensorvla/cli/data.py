"""`sensorvla data ...` and `sensorvla stats`: make, import and extend datasets; each command calls one function."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from sensorvla.config import DataConfig


def keywords(flags: dict, **renamed: str) -> dict:
    """A command's flags (its `locals()` on entry) as the library function's keywords: `renamed` maps a flag to
    the keyword it fills; a tuple of views becomes a list (None when empty)."""
    out = {renamed.get(k, k): v for k, v in flags.items()}
    if "views" in out:
        out["views"] = list(out["views"]) if out["views"] else None
    return out


def wrote(path: Path) -> int:
    """Print the written path; exit code 0."""
    print(f"wrote {path}")
    return 0


def data_synth(
    out: Path,
    episodes: int = 24,
    seed: int = 0,
    sensor_channels: int = 33,
    sensor_rate: float = 650.0,
    image_size: int = 112,
    task: Literal["align_insert", "contact"] = "align_insert",
    image_format: Literal["video", "npy"] = "video",
) -> int:
    """Generate the synthetic insertion dataset (the demo's data, the tests' fixture) as LeRobot v3."""
    flags = dict(locals())
    from sensorvla.world.synth import generate_dataset

    return wrote(generate_dataset(**keywords(flags, out="out_dir", episodes="num_episodes")))


@dataclass
class ImportFlags:
    """The flags every importer takes (`--instruction`, `--image-size`, `--views`, ...)."""

    instruction: str | None = None  # one instruction for every episode
    image_size: int | None = None  # resize frames to N x N (default: the stored size)
    min_actions: int = 8  # episodes with fewer action frames are an error (the training horizon)
    views: tuple[str, ...] | None = None  # import only these views (default: all)
    overwrite: bool = False
    # video: LeRobot video features (mp4); npy: lossless raw frames (not LeRobot-visible)
    image_format: Literal["video", "npy"] = "video"


# The importer flags without a prefix: `--views`, not `--flags.views`.
Importing = Annotated[ImportFlags, tyro.conf.arg(name="")]


def data_import_recorder(src: Path, out: Path, include_joints: bool = False, flags: Importing = ImportFlags()) -> int:  # noqa: B008
    """Convert the original recorder's episode folders (metadata.json, images/, robot_states.csv, sensor_data.npz)."""
    from sensorvla.data.importers.recorder import import_recorder

    options = keywords(dataclasses.asdict(flags))
    return wrote(import_recorder(src, out, include_joints=include_joints, **options))


def data_import_hdf5(src: Path, out: Path, flags: Importing = ImportFlags()) -> int:  # noqa: B008
    """Convert plain HDF5 episodes (docs/hdf5-format.md)."""
    from sensorvla.data.importers.hdf5 import import_hdf5

    return wrote(import_hdf5(src, out, **keywords(dataclasses.asdict(flags))))


def data_add_sensor(
    dataset: Path,
    src: Path,
    clock_offset: float = 0.0,
    name: str = "sensor",
    rate: float | None = None,
    force_channels: int | None = None,
    episode: int | None = None,
    overwrite: bool = False,
) -> int:
    """Attach a sensor stream (CSV/NPZ/HDF5: episode_index, timestamps, values) to a LeRobot v3 dataset, in place.

    --clock-offset S is added to the sensor's timestamps to reach the dataset's clock (frame i of an episode is at
    frame_index / fps). See docs/data-format.md, "Add a sensor to a LeRobot dataset".
    """
    flags = dict(locals())
    from sensorvla.data.attach import add_sensor

    spec = add_sensor(**keywords(flags))
    print(f"attached {name!r} to {dataset}: {json.dumps(spec)}")
    return 0


def stats(dataset: Path, data: DataConfig = DataConfig()) -> int:  # noqa: B008  (tyro reads the default)
    """Compute normalization stats on the training split into <dataset>/meta/norm_stats.json.

    Takes the same --data.* flags as `sensorvla train` (split, sensor keys, sensor transforms), which the
    stats record and training checks.
    """
    import dataclasses

    from sensorvla.data.normalize import compute_stats
    from sensorvla.training.data_setup import stats_path

    s = compute_stats(dataset, data_cfg=dataclasses.replace(data, dataset_dir=str(dataset)))
    s.save(stats_path(dataset))
    fp = {k: v for k, v in s.fingerprint.items() if k != "split"}
    split = s.fingerprint["split"]
    print(f"wrote {stats_path(dataset)} ({split['name']} split: {len(split['episodes'])} episodes; {fp})")
    return 0


def register(app) -> None:
    """Add `data synth|import-recorder|import-hdf5|add-sensor` and `stats` to the `sensorvla` app."""
    from tyro.extras import SubcommandApp

    data = SubcommandApp()
    data.command(data_synth, name="synth")
    data.command(data_import_recorder, name="import-recorder")
    data.command(data_import_hdf5, name="import-hdf5")
    data.command(data_add_sensor, name="add-sensor")
    app.command(data, name="data")
    app.command(stats, name="stats")
