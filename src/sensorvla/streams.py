"""Declared sensor streams: what each sensor input of the policy is, one line of config per stream.

A stream is written `name=kind,key=value,...` (`--data.streams`, saved in config.json), e.g.
`tactile=taxel2d,source=observation.tactile,shape=4x4,rate=100,tokens=4,dropout=0.1`. Keys:

- `=kind`: the encoder from the registry (`models/sensors`): wrench, profile1d, taxel2d, imu, generic (default).
- `source`: the dataset stream (sidecar key or per-frame feature) it reads; empty (default) = the dataset's sensor,
  the batch's `sensor` tensor cut with `--data.sensor-window-s` / `--data.sensor-samples`.
- `channels=A:B`: a slice of the source's last axis (how one vector source is split into streams); default all.
- `shape`: the per-sample shape, `6` or `4x4`; filled in from the dataset.
- `rate` (Hz, checked against the data) and `offset` (s, added to the source's clock offset).
- `window`, `samples`: this stream's window (t - window, t] on `samples` grid points; default the data's.
- `tokens`: the tokens it becomes (default `model.sensor.num_tokens`); `dropout`: the training-time probability
  of dropping it for a sample (its learned missing tokens instead).
- `group`: streams of one group read one source window and are summed per grid point into one set of tokens
  (default: its own group).
- `normalization`: mean_std, quantile or none (default: `--data.normalization`), and `transform`: none (default)
  or signed_log1p (sign(x) log1p(|x| / s), s the median |x| per element of the training split, saved with the
  stats as `log_scale`), both applied by the Normalizer in training and in the runner alike; only for a stream
  with its own `source` (the sensor tensor keeps `--data.normalization` / `--data.sensor-transform`).

A config without streams (every config written before streams existed) means the legacy layout of its one sensor
tensor: `force=wrench,channels=0:F,group=sensor` and `ascan=profile1d,channels=F:C,group=sensor` from
`model.sensor.force_channels` F and `model.sensor.channels` C (`legacy_streams`), the same tokens as before.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_FIELDS = {"source": "source", "channels": "channels", "shape": "shape", "rate": "rate_hz", "offset": "offset_s"}
_FIELDS |= {"window": "window_s", "samples": "samples", "tokens": "tokens", "dropout": "dropout", "group": "group"}
_FIELDS |= {"normalization": "normalization", "transform": "transform"}
NORMALIZATIONS = ("mean_std", "quantile", "none")
TRANSFORMS = ("none", "signed_log1p")
LEGACY_GROUP = "sensor"


class StreamSpecError(ValueError):
    """A stream declaration that cannot be read; the message names the stream and the fix."""


@dataclass(frozen=True)
class StreamSpec:
    """One declared sensor stream (module docstring for the fields)."""

    name: str
    kind: str = "generic"
    source: str = ""
    channels: tuple[int, int] | None = None
    shape: tuple[int, ...] = ()
    rate_hz: float = 0.0
    offset_s: float = 0.0
    window_s: float = 0.0
    samples: int = 0
    tokens: int = 0
    dropout: float = 0.0
    group: str = ""
    normalization: str = ""
    transform: str = ""

    @property
    def key(self) -> str:
        """The batch key of its window: `sensor` (the dataset's sensor, legacy layout) or `sensor.<name>`."""
        return "sensor" if not self.source else f"sensor.{self.name}"

    @property
    def mask_key(self) -> str:
        """The batch key of its grid mask (B, T)."""
        return "sensor_mask" if not self.source else f"sensor_mask.{self.name}"

    @property
    def ts_key(self) -> str:
        """The observation key of its samples' timestamps (N,) at serving time."""
        return "sensor_timestamps" if not self.source else f"sensor_timestamps.{self.name}"

    @property
    def group_name(self) -> str:
        """Its token group: `group`, or its own name."""
        return self.group or self.name

    def to_text(self) -> str:
        """The one-line form `parse_stream` reads (only the fields that differ from the defaults)."""
        parts = [f"{self.name}={self.kind}"]
        default = StreamSpec(self.name)
        for key, attr in _FIELDS.items():
            value = getattr(self, attr)
            if value == getattr(default, attr):
                continue
            if attr == "channels":
                value = f"{value[0]}:{value[1]}"
            elif attr == "shape":
                value = "x".join(str(n) for n in value)
            parts.append(f"{key}={value}")
        return ",".join(parts)


def parse_stream(text: str) -> StreamSpec:
    """`name=kind,key=value,...` -> StreamSpec; StreamSpecError naming the stream, the key and the fix."""
    head, *rest = [p.strip() for p in str(text).split(",")]
    name, _, kind = head.partition("=")
    if not _NAME.match(name):
        raise StreamSpecError(f"stream {text!r}: the name {name!r} must be an identifier (letters, digits, _ . -)")
    values: dict = {"name": name, "kind": kind or "generic"}
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep or key not in _FIELDS:
            raise StreamSpecError(f"stream {name!r}: unknown setting {part!r}; use key=value with keys {list(_FIELDS)}")
        attr = _FIELDS[key]
        try:
            if attr == "channels":
                a, _, b = value.partition(":")
                values[attr] = (int(a or 0), int(b))
            elif attr == "shape":
                values[attr] = tuple(int(n) for n in value.split("x")) if value else ()
            elif attr in ("samples", "tokens"):
                values[attr] = int(value)
            elif attr in ("source", "group", "normalization", "transform"):
                values[attr] = value
            else:
                values[attr] = float(value)
        except ValueError as e:
            raise StreamSpecError(f"stream {name!r}: {key}={value!r} is not a valid {key} ({e})") from None
    spec = StreamSpec(**values)
    check_spec(spec)
    return spec


def check_spec(spec: StreamSpec) -> None:
    """Raise StreamSpecError for values out of range."""
    if spec.channels is not None and not 0 <= spec.channels[0] < spec.channels[1]:
        raise StreamSpecError(f"stream {spec.name!r}: channels {spec.channels} must be A:B with 0 <= A < B")
    if any(n <= 0 for n in spec.shape) or len(spec.shape) > 2:
        raise StreamSpecError(f"stream {spec.name!r}: shape {spec.shape} must be a vector (N) or a 2-D array (HxW)")
    if not 0 <= spec.dropout < 1 or spec.window_s < 0 or spec.samples < 0 or spec.tokens < 0 or spec.rate_hz < 0:
        raise StreamSpecError(f"stream {spec.name!r}: dropout must be in [0, 1); window, samples, tokens, rate >= 0")
    if spec.normalization not in ("", *NORMALIZATIONS) or spec.transform not in ("", *TRANSFORMS):
        raise StreamSpecError(
            f"stream {spec.name!r}: normalization={spec.normalization!r} / transform={spec.transform!r}: choose "
            f"normalization from {NORMALIZATIONS} and transform from {TRANSFORMS}"
        )
    if not spec.source and (spec.normalization or spec.transform):
        raise StreamSpecError(
            f"stream {spec.name!r}: normalization / transform are per stream for a stream with its own `source`; "
            "the dataset's sensor tensor uses --data.normalization and --data.sensor-transform"
        )
    if spec.channels is not None and spec.source and len(spec.shape) > 1:
        raise StreamSpecError(f"stream {spec.name!r}: channels slice a vector source, not a {spec.shape} array")


def legacy_streams(channels: int, force_channels: int) -> tuple[StreamSpec, ...]:
    """The two streams of the legacy sensor tensor (C channels, the first F force, the rest an A-scan profile)."""
    f = min(max(force_channels, 0), channels)
    out = []
    if f:
        out.append(StreamSpec("force", "wrench", channels=(0, f), shape=(f,), group=LEGACY_GROUP))
    if channels > f:
        out.append(StreamSpec("ascan", "profile1d", channels=(f, channels), shape=(channels - f,), group=LEGACY_GROUP))
    return tuple(out)


def model_streams(declared, channels: int, force_channels: int) -> tuple[StreamSpec, ...]:
    """Every stream a model reads: the declared ones (StreamSpec or their one-line form), after the legacy pair of the
    dataset's sensor tensor (C = `channels`) unless a declared stream already reads that tensor (`source` empty)."""
    specs = tuple(s if isinstance(s, StreamSpec) else parse_stream(s) for s in declared)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise StreamSpecError(f"stream names must be unique, got {names}")
    if channels and not any(not s.source for s in specs):
        specs = legacy_streams(channels, force_channels) + specs
    return tuple(_on_tensor(s, channels) if not s.source else s for s in specs)


def _on_tensor(spec: StreamSpec, channels: int) -> StreamSpec:
    """A stream of the dataset's sensor tensor with its channel slice and shape filled in (all channels by default)."""
    a, b = spec.channels or (0, channels)
    if channels and b > channels:
        raise StreamSpecError(f"stream {spec.name!r}: channels {a}:{b} exceed the sensor's {channels} channels")
    return dataclasses.replace(spec, channels=(a, b), shape=(b - a,))


__all__ = [
    "LEGACY_GROUP",
    "NORMALIZATIONS",
    "TRANSFORMS",
    "StreamSpec",
    "StreamSpecError",
    "legacy_streams",
    "model_streams",
    "parse_stream",
]
