"""`sensorvla data ...` and `sensorvla stats`: make, import and extend datasets; each command calls one function."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Literal

import tyro

from sensorvla.config import DataConfig
from sensorvla.data.options import AttachOptions, ImportOptions


def keywords(flags: dict, **renamed: str) -> dict:
    """A command's flags (its `locals()` on entry) as the library function's keywords: `renamed` maps a flag to
    the keyword it fills."""
    return {renamed.get(k, k): v for k, v in flags.items()}


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
    image_size: int | None = None,
    task: Literal["align_insert", "contact"] = "align_insert",
    image_format: Literal["video", "npy"] = "video",
    env: Literal["sensorvla/PegInHole-v0", "sensorvla/BlindBottom-v0", "sensorvla/Needle-v0"] | None = None,
    no_sensor_fraction: float | None = None,
    streams: tuple[Literal["tactile", "imu"], ...] = (),
) -> int:
    """Generate scripted demonstrations as LeRobot v3: the synthetic insertion dataset (the demo's data, the tests'
    fixture; 112 px, 20 % of the episodes without the sensor by default; --streams tactile imu adds a 4x4 tactile
    array at 100 Hz and a 6-axis IMU at 1 kHz, declared streams training reads) or, with --env, a MuJoCo contact
    task's (needs sensorvla[sim]; 64 px, every episode with the sensor by default; --task, --sensor-* and --streams
    do not apply: the task's sensor is its 500 Hz force/torque stream)."""
    flags = dict(locals())
    if env is not None:
        from sensorvla.world.contact_record import generate_contact_dataset

        path = generate_contact_dataset(
            out,
            task=env,
            num_episodes=episodes,
            seed=seed,
            image_size=image_size or 64,
            no_sensor_fraction=no_sensor_fraction or 0.0,
            image_format=image_format,
        )
        return wrote(path)
    from sensorvla.world.synth import generate_dataset

    flags.pop("env")
    flags["extra_streams"] = flags.pop("streams")
    flags["image_size"] = image_size or 112
    flags["no_sensor_fraction"] = 0.2 if no_sensor_fraction is None else no_sensor_fraction
    return wrote(generate_dataset(**keywords(flags, out="out_dir", episodes="num_episodes")))


# The options as flags without a prefix: `--views`, not `--flags.views`.
Importing = Annotated[ImportOptions, tyro.conf.arg(name="")]
Attaching = Annotated[AttachOptions, tyro.conf.arg(name="")]


def data_import_recorder(src: Path, out: Path, include_joints: bool = False, flags: Importing = ImportOptions()) -> int:  # noqa: B008
    """Convert the original recorder's episode folders (metadata.json, images/, robot_states.csv, sensor_data.npz)."""
    from sensorvla.data.importers.recorder import import_recorder

    return wrote(import_recorder(src, out, include_joints=include_joints, **dataclasses.asdict(flags)))


def data_import_hdf5(src: Path, out: Path, flags: Importing = ImportOptions()) -> int:  # noqa: B008
    """Convert plain HDF5 episodes (docs/hdf5-format.md)."""
    from sensorvla.data.importers.hdf5 import import_hdf5

    return wrote(import_hdf5(src, out, **dataclasses.asdict(flags)))


def data_add_sensor(dataset: Path, src: Path, flags: Attaching = AttachOptions()) -> int:  # noqa: B008
    """Attach a sensor stream (CSV/NPZ/HDF5: episode_index, timestamps, values) to a LeRobot v3 dataset, in place.

    --clock-offset S is added to the sensor's timestamps to reach the dataset's clock (frame i of an episode is at
    frame_index / fps). See docs/data-format.md, "Add a sensor to a LeRobot dataset".
    """
    from sensorvla.data.attach import add_sensor

    spec = add_sensor(dataset, src, **dataclasses.asdict(flags))
    print(f"attached {flags.name!r} to {dataset}: {json.dumps(spec)}")
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
