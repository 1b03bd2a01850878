"""Timestamp alignment, correct by construction: nothing returned for time t comes from after t.

Pure functions over sorted timestamp arrays (float64 seconds on the common clock). They work on
memory-mapped arrays: each slices with `searchsorted` first and copies only the slice it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sensorvla.streams import StreamSpec, parse_stream

if TYPE_CHECKING:
    from sensorvla.config import DataConfig


def latest_at_or_before(timestamps: np.ndarray, t: float) -> int:
    """Index of the newest sample with timestamp <= t, or -1 when there is none."""
    return int(np.searchsorted(timestamps, t, side="right")) - 1


def value_at(timestamps: np.ndarray, values: np.ndarray, t: float) -> np.ndarray:
    """The newest (C,) row of `values` at or before t (zero-order hold). Interpolating *at* t would need a
    sample after t, i.e. the future, so the newest past sample is the causal estimate.
    Raises ValueError when no sample exists at or before t.
    """
    i = latest_at_or_before(timestamps, t)
    if i < 0:
        raise ValueError(f"no sample at or before t={t:.6f}")
    return np.asarray(values[i], dtype=np.float32)


def hold_at(ts: np.ndarray, values: np.ndarray, times: np.ndarray, max_gap_s: float) -> tuple[np.ndarray, np.ndarray]:
    """A stream's value at each of `times` (K,), causally: the newest sample at or before each time (zero-order
    hold, the value the sensor window's last grid point takes there), measured only when that sample is at most
    `max_gap_s` old.

    Args:
        ts: (N,) sorted timestamps; values: (N, C) (may be a memory-mapped array: only the K rows used are read).
        times: (K,) query times on the same clock; max_gap_s: the gap rule of `SensorWindow`.

    Returns:
        values float32 (K, C), 0 where masked; mask bool (K,), True where a sample within `max_gap_s` backs the time.
    """
    times = np.asarray(times, np.float64)
    left = np.searchsorted(ts, times, side="right") - 1
    rows = np.clip(left, 0, max(len(ts) - 1, 0))
    mask = (left >= 0) & (times - (np.asarray(ts[rows], np.float64) if len(ts) else 0.0) <= max_gap_s)
    out = np.zeros((len(times), values.shape[1]), np.float32)
    if mask.any():
        out[mask] = np.asarray(values[rows[mask]], np.float32)
    return out, mask


def window_grid(t: float, window_s: float, num_samples: int) -> np.ndarray:
    """Uniform grid of `num_samples` points covering (t - window_s, t]; the last point is exactly t."""
    step = window_s / num_samples
    return t - window_s + step * np.arange(1, num_samples + 1, dtype=np.float64)


def window_slice(ts: np.ndarray, t: float, window_s: float, num_samples: int, max_gap_s: float) -> tuple[int, int]:
    """[lo, hi): the rows of a sorted stream that `resample_window` reads for the window ending at t
    (from one gap before the first grid point up to t; samples strictly after t are never touched)."""
    grid0 = t - window_s + window_s / num_samples
    return int(np.searchsorted(ts, grid0 - max_gap_s, side="left")), int(np.searchsorted(ts, t, side="right"))


def resample_window(
    ts: np.ndarray, data: np.ndarray, t: float, window_s: float, num_samples: int, max_gap_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a high-rate stream onto the window grid ending at t.

    Args:
        ts: (N,) sorted timestamps; data: (N, C) values (may be a memory-mapped array).
        t: the frame time; window_s: W; num_samples: T_s; max_gap_s: a grid point is "measured" only if
            a sample lies within max_gap_s at or before it (and, for interpolation, after it but <= t).

    Returns:
        values float32 (T_s, C) — per-channel linear interpolation between the neighbouring samples
        that are both <= t; after the newest sample <= t the value is held; 0 where masked.
        mask bool (T_s,) — True where the grid point is backed by measured samples.
    """
    grid = window_grid(t, window_s, num_samples)
    channels = data.shape[1]
    lo, hi = window_slice(ts, t, window_s, num_samples, max_gap_s)
    seg_t = np.asarray(ts[lo:hi], dtype=np.float64)
    values = np.zeros((num_samples, channels), np.float32)
    mask = np.zeros(num_samples, bool)
    if seg_t.size == 0:
        return values, mask
    seg = np.asarray(data[lo:hi], dtype=np.float32)
    right = np.searchsorted(seg_t, grid, side="left")  # first sample >= grid point
    left = np.searchsorted(seg_t, grid, side="right") - 1  # last sample <= grid point
    has_left = left >= 0
    li = np.clip(left, 0, seg_t.size - 1)
    ri = np.clip(right, 0, seg_t.size - 1)
    has_right = right < seg_t.size
    left_gap = np.where(has_left, grid - seg_t[li], np.inf)
    mask = has_left & (left_gap <= max_gap_s)
    exact = has_right & (seg_t[ri] == grid)
    interp = has_left & has_right & ~exact & ((seg_t[ri] - seg_t[li]) <= 2 * max_gap_s)
    denom = np.where(interp, seg_t[ri] - seg_t[li], 1.0)
    w = np.where(interp, (grid - seg_t[li]) / denom, 0.0).astype(np.float32)[:, None]
    out = seg[li] * (1 - w) + seg[ri] * w
    out = np.where(exact[:, None], seg[ri], out)
    mask = mask | exact
    values = np.where(mask[:, None], out, 0.0).astype(np.float32)
    return values, mask


@dataclass(frozen=True)
class SensorWindow:
    """The one definition of the sensor window: (t - window_s, t] on `samples` grid points (T_s); a grid point
    counts as measured only with a sample within `max_gap_s`. Built from the config saved with the model
    (`data.sensor_window_s`, `data.sensor_samples`) by the dataset, the policy and the runner alike."""

    window_s: float
    samples: int
    max_gap_s: float
    streams: tuple[StreamSpec, ...] = ()  # the declared streams (`--data.streams`, sensorvla/streams.py)

    @classmethod
    def from_config(cls, cfg: DataConfig, max_gap_s: float | None = None) -> SensorWindow:
        """The window of a data config; `max_gap_s` None = two grid steps, at least 20 ms (the training rule)."""
        gap = max(2 * cfg.sensor_window_s / cfg.sensor_samples, 0.02) if max_gap_s is None else float(max_gap_s)
        streams = tuple(parse_stream(s) for s in cfg.streams)
        return cls(float(cfg.sensor_window_s), int(cfg.sensor_samples), gap, streams)

    def of(self, spec: StreamSpec) -> SensorWindow:
        """The window of a stream with its own source: its `window`/`samples` (default this one's), the same gap
        rule (two grid steps, at least 20 ms, unless this window's tolerance is wider)."""
        window_s, samples = spec.window_s or self.window_s, spec.samples or self.samples
        return SensorWindow(window_s, samples, max(2 * window_s / samples, 0.02, self.max_gap_s))

    def slice(self, ts: np.ndarray, t: float) -> tuple[int, int]:
        """[lo, hi) rows of sorted `ts` that the window ending at t can read."""
        return window_slice(ts, t, self.window_s, self.samples, self.max_gap_s)

    def resample(self, ts: np.ndarray, values: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(N, *shape) samples -> the window ending at t: values float32 (T_s, *shape), mask bool (T_s,)."""
        flat = values.reshape(len(values), int(np.prod(values.shape[1:]))) if values.ndim != 2 else values  # N may be 0
        out, mask = resample_window(ts, flat, t, self.window_s, self.samples, self.max_gap_s)
        return out.reshape(self.samples, *values.shape[1:]), mask

    def empty(self, channels: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """An all-missing window: zeros float32 (T_s, channels) or (T_s, *shape), mask False (T_s,)."""
        shape = tuple(channels) if isinstance(channels, tuple) else (max(channels, 1),)
        return np.zeros((self.samples, *shape), np.float32), np.zeros(self.samples, bool)
