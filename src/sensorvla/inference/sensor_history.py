"""`SensorHistory`: one episode's raw sensor samples, keyed by timestamp, resampled onto the trained window.

A client may send only the samples that are new since its last call, or a whole (overlapping) window each
call; both leave the same buffer, so the policy sees the same window as a one-shot send of every sample.
The window itself comes from `data/timeline.resample_window`, the function the dataset uses, so training
and serving agree on the grid, the interpolation and the gap rule (a grid point without a measured sample
within `max_gap_s` is masked, never zero-filled as if measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sensorvla.data.timeline import resample_window
from sensorvla.serving.protocol import LimitExceededError, ObservationError

__all__ = ["SensorHistory", "SensorHistoryError", "SensorHistoryFullError", "ExtendResult"]


class SensorHistoryError(ObservationError):
    """Samples that contradict the buffered history (out of order, or a timestamp resent with other values)."""


class SensorHistoryFullError(LimitExceededError):
    """Samples that would take a connection's history past its capacity (nothing is added)."""


@dataclass(frozen=True)
class ExtendResult:
    """What `SensorHistory.extend` did with a batch of samples."""

    new: int  # appended (newer than every buffered sample)
    duplicates: int  # already buffered with identical values (a resent window)
    ignored_old: int  # older than the history still kept; they cannot change any later window


class SensorHistory:
    """Bounded buffer of (timestamp, sample) pairs for one episode.

    Rules for `extend(ts, values)`:
        - `ts` must increase strictly within one call (checked by the caller's validation too);
        - a sample newer than every buffered one is appended;
        - a sample at or before the newest buffered one must equal a buffered sample exactly (same
          timestamp, same values): it is a resent duplicate and is dropped; anything else is out of order
          and raises `SensorHistoryError`;
        - samples older than what the history still keeps (`window_s + max_gap_s` before the last query
          time) are ignored: no later window can use them;
        - samples that would take the buffer past `capacity` are refused (`SensorHistoryFullError`, nothing is
          added): the memory of a connection is bounded, and a window is never silently thinned.

    Args:
        channels: C_s.
        window_s: the trained window length W (`--data.sensor-window-s`).
        num_samples: the trained grid size T_s (`--data.sensor-samples`).
        max_gap_s: gap tolerance; the same value the dataset used in training.
        capacity: most samples kept (memory bound per connection: capacity x (4 C_s + 8) bytes).
    """

    def __init__(self, channels: int, window_s: float, num_samples: int, max_gap_s: float, capacity: int = 65536):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.channels = int(channels)
        self.window_s = float(window_s)
        self.num_samples = int(num_samples)
        self.max_gap_s = float(max_gap_s)
        self.capacity = int(capacity)
        self.keep_s = self.window_s + self.max_gap_s  # how far before t a window can look
        self.reset()

    def reset(self) -> None:
        """Forget every sample and the query time (an episode start)."""
        self._ts = np.zeros(0, np.float64)
        self._values = np.zeros((0, self.channels), np.float32)
        self._horizon = -np.inf  # samples before this are forgotten
        self.last_query_t: float | None = None

    def __len__(self) -> int:
        return int(self._ts.size)

    @property
    def newest(self) -> float | None:
        """Timestamp of the newest buffered sample (None when empty)."""
        return float(self._ts[-1]) if self._ts.size else None

    def extend(self, ts: np.ndarray, values: np.ndarray) -> ExtendResult:
        """Add samples ts float64 (N,), values float32 (N, C_s); see the class docstring for the rules.

        Raises:
            SensorHistoryError: a sample is out of order or contradicts a buffered one (nothing is added).
        """
        ts = np.asarray(ts, np.float64).reshape(-1)
        values = np.asarray(values, np.float32).reshape(len(ts), self.channels)
        if ts.size > 1 and not (np.diff(ts) > 0).all():
            raise SensorHistoryError("sensor_timestamps must increase strictly within one request")
        old = ts < self._horizon
        ignored = int(old.sum())
        ts, values = ts[~old], values[~old]
        newest = self.newest
        if newest is None or ts.size == 0:
            overlap = np.zeros(ts.size, bool)
        else:
            overlap = ts <= newest
        dup = 0
        if overlap.any():
            o_ts, o_vals = ts[overlap], values[overlap]
            idx = np.searchsorted(self._ts, o_ts)
            found = (idx < self._ts.size) & (self._ts[np.minimum(idx, self._ts.size - 1)] == o_ts)
            if not found.all():
                bad = float(o_ts[~found][0])
                raise SensorHistoryError(
                    f"sensor sample at t={bad:.6f} is older than the newest buffered sample (t={newest:.6f}) but "
                    "was never sent: samples must arrive in time order. Send only samples newer than the last "
                    "ones (or resend them unchanged); at an episode start with a restarted clock call reset()"
                )
            if not np.array_equal(self._values[idx], o_vals):
                row = int(np.flatnonzero((self._values[idx] != o_vals).any(axis=1))[0])
                raise SensorHistoryError(
                    f"sensor sample at t={float(o_ts[row]):.6f} was already received with different values: a "
                    "resent sample must be identical; stamp new samples with new timestamps, or call reset()"
                )
            dup = int(overlap.sum())
        fresh_ts, fresh_vals = ts[~overlap], values[~overlap]
        if self._ts.size + fresh_ts.size > self.capacity:
            raise SensorHistoryFullError(
                f"this connection's sensor history would hold {self._ts.size + fresh_ts.size} samples, over its "
                f"capacity of {self.capacity} (`sensorvla serve --max-history-samples`); it keeps the samples a "
                f"later window can use ({self.keep_s:.3g} s before the last query, and every sample after it): "
                "query more often, send only samples up to the query time, or call reset()"
            )
        if fresh_ts.size:
            self._ts = np.concatenate([self._ts, fresh_ts])
            self._values = np.concatenate([self._values, fresh_vals])
        return ExtendResult(new=int(fresh_ts.size), duplicates=dup, ignored_old=ignored)

    def count_between(self, lo: float, hi: float) -> int:
        """Buffered samples with lo <= timestamp <= hi."""
        return int(np.searchsorted(self._ts, hi, side="right") - np.searchsorted(self._ts, lo, side="left"))

    def check_time(self, t: float) -> None:
        """Raise `SensorHistoryError` when query time t is earlier than the previous query."""
        if self.last_query_t is not None and t < self.last_query_t:
            raise SensorHistoryError(
                f"timestamp t={t:.6f} is earlier than the previous query (t={self.last_query_t:.6f}); time must "
                "not go backwards within an episode: call reset() at an episode start"
            )

    def window(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """The trained window ending at t: values float32 (T_s, C_s), mask bool (T_s,) (True = measured).

        Query times must not decrease within an episode. Samples too old for any later window are pruned.

        Raises:
            SensorHistoryError: t is earlier than the previous query.
        """
        t = float(t)
        self.check_time(t)
        values, mask = resample_window(self._ts, self._values, t, self.window_s, self.num_samples, self.max_gap_s)
        self.last_query_t = t
        horizon = t - self.keep_s
        if horizon > self._horizon:
            self._horizon = horizon
            keep = int(np.searchsorted(self._ts, horizon, side="left"))
            if keep:
                self._ts, self._values = self._ts[keep:], self._values[keep:]
        return values, mask
