"""Example HDF5 episode files (docs/hdf5-format.md) drawn from the synthetic insertion task."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from sensorvla.data.importers.hdf5 import write_hdf5
from sensorvla.data.types import EpisodeData
from sensorvla.world.synth import SimConfig, simulate_episode


def iter_example_episodes(
    num_episodes: int = 2,
    *,
    seed: int = 0,
    image_size: int = 32,
    sensor_channels: int = 33,
    with_sensor: Sequence[bool] | None = None,
) -> Iterator[EpisodeData]:
    """Synthetic insertion episodes (`world/synth.py`) to build example HDF5 files from."""

    cfg = SimConfig(image_size=image_size, sensor_channels=sensor_channels)
    for e in range(num_episodes):
        has = True if with_sensor is None else bool(with_sensor[e])
        yield simulate_episode(seed * 100_003 + e, cfg, with_sensor=has, name=f"example_{e:04d}")


def export_hdf5_example(out_dir: str | Path, **example) -> list[Path]:
    """Write valid example files (one episode each) into `out_dir`; returns their paths.

    `example`: the options of `iter_example_episodes` (num_episodes=2, seed, image_size, sensor_channels,
    with_sensor). `sensorvla data import-hdf5 --src out_dir --out DIR` then imports them.
    """
    return [
        write_hdf5(Path(out_dir) / f"{ep.name}.h5", ep, action_fps=10.0, force_channels=1, sensor_rate=650.0)
        for ep in iter_example_episodes(**example)
    ]
