"""In-memory episode container shared by the writer, the importers and the synthetic generator.

An `EpisodeData` holds every stream of one episode with its own timestamps. Nothing here touches disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class DataError(ValueError):
    """Bad input data. The message names the episode, the file and the fix."""

    def __init__(self, message: str, *, episode: str | None = None, path: str | None = None, fix: str = ""):
        parts = []
        if episode is not None:
            parts.append(f"episode {episode!r}")
        if path is not None:
            parts.append(f"file {path}")
        where = f"[{', '.join(parts)}] " if parts else ""
        text = f"{where}{message}"
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)
        self.episode = episode
        self.path = path
        self.fix = fix


@contextmanager
def as_data_error(
    catch: type[BaseException] | tuple[type[BaseException], ...],
    message: str | Callable[[BaseException], str],
    *,
    episode: str | None = None,
    path: str | Path | None = None,
    fix: str = "",
) -> Iterator[None]:
    """Turn an exception of type `catch` raised in the block into a `DataError` (chained to it) naming the episode,
    the file and the fix: how a reading step reports a corrupt input. `message` may be a function of the exception;
    a `DataError` raised in the block passes unchanged."""
    try:
        yield
    except DataError:
        raise  # already says what is wrong
    except catch as e:
        text = message(e) if callable(message) else message
        raise DataError(text, episode=episode, path=None if path is None else str(path), fix=fix) from e


def error_text(e: BaseException) -> str:
    """ "Type: text" of an exception, for a DataError's message."""
    return f"{type(e).__name__}: {e}"


def check_increasing(
    ts, *, what: str, episode: str | None = None, path: str | Path | None = None, fix: str = "", strict: bool = True
) -> None:
    """DataError unless the timestamps `ts` (N,) are finite and strictly increasing (`strict=False`: non-decreasing),
    naming the first offending sample; `fix` is said for either (after "sort the samples by time" for the order)."""
    t = np.asarray(ts, np.float64)
    where = None if path is None else str(path)
    bad = ~np.isfinite(t)
    if bad.any():
        k = int(np.argmax(bad))
        raise DataError(
            f"{what} timestamps hold NaN/inf ({int(bad.sum())} values; first at sample {k})",
            episode=episode,
            path=where,
            fix=fix or "fix or drop the corrupt rows",
        )
    d = np.diff(t)
    wrong = d <= 0 if strict else d < 0
    if wrong.any():
        k = int(np.argmax(wrong))
        raise DataError(
            f"{what} timestamps are not {'strictly ' if strict else ''}increasing (sample {k} at {t[k]:.6f} s, "
            f"sample {k + 1} at {t[k + 1]:.6f} s)",
            episode=episode,
            path=where,
            fix="sort the samples by time and drop duplicates" + (f"; {fix}" if fix else ", or fix the recorder clock"),
        )


def median_rate(ts) -> float | None:
    """1 / the median step of timestamps `ts` (N,) in Hz, rounded to 1e-6; None when it cannot be told."""
    ts = np.asarray(ts, np.float64)
    step = float(np.median(np.diff(ts))) if len(ts) > 1 else 0.0
    return round(1.0 / step, 6) if np.isfinite(step) and step > 0 else None


class Stream(NamedTuple):
    """One stream of an episode on its own clock: timestamps (N,) float64 seconds, values (N, ...) (a camera's
    frames (N, h, w, 3) uint8), and the offset in seconds added to its timestamps to reach the common clock."""

    timestamps: np.ndarray
    values: Any
    offset: float = 0.0


@dataclass
class ImageStream:
    """One camera view: frame timestamps (N_v,) float64 seconds and frames (N_v, h, w, 3) uint8."""

    timestamps: np.ndarray
    frames: np.ndarray


@dataclass
class EpisodeData:
    """One episode in memory.

    Timestamps are float64 seconds on each stream's own clock; `clock_offsets[stream]` (seconds) is
    *added* to that stream's timestamps to reach the common clock. Streams: "action", "state", "sensor",
    and "image.<view>".

    Shapes: actions (N_a, D_a) at the action rate with `action_timestamps` (N_a,); state (N_st, D_st) with
    `state_timestamps` (N_st,); sensor (N_s, C_s) with `sensor_timestamps` (N_s,) or None when the episode
    has no sensor; images maps view name -> ImageStream.
    """

    name: str
    instruction: str
    action_timestamps: np.ndarray
    actions: np.ndarray
    state_timestamps: np.ndarray
    state: np.ndarray
    images: dict[str, ImageStream]
    sensor_timestamps: np.ndarray | None = None
    sensor: np.ndarray | None = None
    clock_offsets: dict[str, float] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)  # JSON-serialisable per-episode metadata
    sensor_streams: dict[str, Stream] = field(default_factory=dict)  # other sensors: sidecar key -> (N, *shape)

    @classmethod
    def from_streams(
        cls, name: str, instruction: str, streams: Mapping[str, Stream], extra: dict[str, object] | None = None
    ) -> EpisodeData:
        """An episode from its streams by name: "action", "state", "image.<view>" (in view order) and, when it was
        recorded, "sensor"; `clock_offsets` are the streams' offsets. How every reader builds one."""
        action, state, sensor = streams["action"], streams["state"], streams.get("sensor")
        views = {k.removeprefix("image."): s for k, s in streams.items() if k.startswith("image.")}
        return cls(
            name=name,
            instruction=instruction,
            action_timestamps=action.timestamps,
            actions=action.values,
            state_timestamps=state.timestamps,
            state=state.values,
            images={v: ImageStream(s.timestamps, s.values) for v, s in views.items()},
            sensor_timestamps=None if sensor is None else sensor.timestamps,
            sensor=None if sensor is None else sensor.values,
            clock_offsets={k: s.offset for k, s in streams.items()},
            extra={} if extra is None else extra,
        )
