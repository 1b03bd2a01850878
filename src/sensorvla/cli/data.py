"""`sensorvla data ...` and `sensorvla stats`: make, import and extend datasets; each command calls one function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from sensorvla.config import DataConfig


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
    from sensorvla.world.synth import generate_dataset

    path = generate_dataset(
        out,
        num_episodes=episodes,
        seed=seed,
        sensor_channels=sensor_channels,
        sensor_rate=sensor_rate,
        image_size=image_size,
        task=task,
        image_format=image_format,
    )
    print(f"wrote {path}")
    return 0


def data_import_recorder(
    src: Path,
    out: Path,
    instruction: str | None = None,
    image_size: int | None = None,
    min_actions: int = 8,
    views: tuple[str, ...] | None = None,
    include_joints: bool = False,
    overwrite: bool = False,
    image_format: Literal["video", "npy"] = "video",
) -> int:
    """Convert the original recorder's episode folders (metadata.json, images/, robot_states.csv, sensor_data.npz).

    --image-format video writes LeRobot video features (mp4); npy keeps lossless raw frames (not LeRobot-visible).
    """
    from sensorvla.data.importers.recorder import import_recorder

    path = import_recorder(
        src,
        out,
        instruction=instruction,
        image_size=image_size,
        min_actions=min_actions,
        views=list(views) if views else None,
        include_joints=include_joints,
        overwrite=overwrite,
        image_format=image_format,
    )
    print(f"wrote {path}")
    return 0


def data_import_hdf5(
    src: Path,
    out: Path,
    instruction: str | None = None,
    image_size: int | None = None,
    min_actions: int = 8,
    views: tuple[str, ...] | None = None,
    overwrite: bool = False,
    image_format: Literal["video", "npy"] = "video",
) -> int:
    """Convert plain HDF5 episodes (docs/hdf5-format.md); --image-format as for import-recorder."""
    from sensorvla.data.importers.hdf5 import import_hdf5

    path = import_hdf5(
        src,
        out,
        instruction=instruction,
        image_size=image_size,
        min_actions=min_actions,
        views=list(views) if views else None,
        overwrite=overwrite,
        image_format=image_format,
    )
    print(f"wrote {path}")
    return 0


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
    from sensorvla.data.attach import add_sensor

    spec = add_sensor(
        dataset,
        src,
        clock_offset=clock_offset,
        name=name,
        rate=rate,
        force_channels=force_channels,
        episode=episode,
        overwrite=overwrite,
    )
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
