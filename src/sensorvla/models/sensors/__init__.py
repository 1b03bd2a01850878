"""Sensor encoders, one per stream kind, registered by name (`--model.sensor.streams name=KIND,...`).

Each kind is one file with one `nn.Module`: `Kind(shape, dim, cfg)` maps one grid point of its stream, (N, *shape),
to (N, dim). Adding a kind is that file plus its line in `KINDS`; `encoder.SensorEncoder` does the rest (temporal
Transformer, learned queries, missing tokens, dropout) for every stream alike.
"""

from __future__ import annotations

from sensorvla.models.sensors.generic import Generic
from sensorvla.models.sensors.imu import Imu
from sensorvla.models.sensors.profile1d import Profile1d
from sensorvla.models.sensors.taxel2d import Taxel2d
from sensorvla.models.sensors.wrench import Wrench

KINDS = {"wrench": Wrench, "profile1d": Profile1d, "taxel2d": Taxel2d, "imu": Imu, "generic": Generic}

__all__ = ["KINDS"]
