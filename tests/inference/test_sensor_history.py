"""SensorHistory: incremental or overlapping sends equal a one-shot window, gaps are masked, order is enforced."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorvla.data.timeline import resample_window
from sensorvla.inference.sensor_history import SensorHistory, SensorHistoryError, SensorHistoryFullError
from sensorvla.serving.protocol import ObservationError

W, T_S, GAP, C = 0.1, 32, 0.02, 3


def stream(n: int, seed: int = 0, rate: float = 650.0, gaps: tuple[tuple[int, float], ...] = ()):
    """n samples at `rate` from t=0, with extra pauses (index, seconds) inserted; values random float32."""
    dt = np.full(n, 1 / rate)
    for i, pause in gaps:
        dt[i] += pause
    ts = np.cumsum(dt)
    values = np.random.default_rng(seed).normal(size=(n, C)).astype(np.float32)
    return ts, values


def one_shot(ts, values, t):
    """What the stateless path (and the dataset) computes from every sample at once."""
    return resample_window(ts, values, t, W, T_S, GAP)


@st.composite
def send_plans(draw):
    """A stream and a plan of calls: each call sends samples [lo, hi) (lo may reach back: a resent window)
    and queries at a time between the newest sample sent and the next one."""
    n = draw(st.integers(10, 300))
    gaps = tuple(
        draw(st.lists(st.tuples(st.integers(1, n - 1), st.floats(0.0, 0.3)), max_size=3, unique_by=lambda g: g[0]))
    )
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=8))) | {n})
    calls, start = [], 0
    for hi in cuts:
        back = draw(st.integers(0, start))  # resend up to everything already sent
        lag = draw(st.floats(0.0, 1.0))  # query time within [newest, next sample)
        calls.append((start - back, hi, lag))
        start = hi
    return n, gaps, calls, draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(send_plans())
def test_incremental_and_overlapping_sends_equal_a_one_shot_window(plan):
    n, gaps, calls, seed = plan
    ts, values = stream(n, seed, gaps=gaps)
    hist = SensorHistory(C, W, T_S, GAP, capacity=10_000)
    for lo, hi, lag in calls:
        hist.extend(ts[lo:hi], values[lo:hi])
        nxt = ts[hi] if hi < n else ts[-1] + 0.05
        t = ts[hi - 1] + lag * (nxt - ts[hi - 1]) * 0.999
        got_v, got_m = hist.window(t)
        want_v, want_m = one_shot(ts, values, t)  # every sample, including ones after t (they are ignored)
        np.testing.assert_array_equal(got_m, want_m)
        np.testing.assert_array_equal(got_v, want_v)
    assert len(hist) <= n


def test_resent_whole_window_is_deduplicated_and_counted():
    ts, values = stream(200)
    hist = SensorHistory(C, W, T_S, GAP)
    first = hist.extend(ts[:100], values[:100])
    hist.window(ts[99])
    again = hist.extend(ts[40:150], values[40:150])  # overlaps the first send
    assert first.new == 100 and first.duplicates == 0
    buffered_before = ts[:100][ts[:100] >= ts[99] - W - GAP]
    assert again.new == 50
    assert again.duplicates + again.ignored_old == 60
    assert again.duplicates == np.count_nonzero(ts[40:100] >= buffered_before[0])
    np.testing.assert_array_equal(hist.window(ts[149])[0], one_shot(ts, values, ts[149])[0])


def test_gap_longer_than_tolerance_is_masked_never_zero_filled_as_data():
    ts, values = stream(120, gaps=((60, 0.05),))  # a 50 ms pause > GAP = 20 ms
    hist = SensorHistory(C, W, T_S, GAP)
    hist.extend(ts, values)
    window, mask = hist.window(ts[-1])
    grid = ts[-1] - W + (W / T_S) * np.arange(1, T_S + 1)
    # grid points in the pause, more than GAP after the last sample before it, are missing...
    in_gap = (grid > ts[59] + GAP) & (grid < ts[60])
    assert in_gap.any() and not mask[in_gap].any()
    assert mask[grid >= ts[60]].all()  # ...the measured part after it is not
    assert (window[~mask] == 0).all()  # masked rows are zero and flagged, never passed off as data


def test_out_of_order_timestamp_is_a_clear_error_and_changes_nothing():
    ts, values = stream(50)
    hist = SensorHistory(C, W, T_S, GAP)
    hist.extend(ts[::2], values[::2])  # even samples only
    with pytest.raises(SensorHistoryError, match="older than the newest buffered sample .* never sent"):
        hist.extend(ts[1:4:2], values[1:4:2])  # odd samples in between: genuinely new but out of order
    assert len(hist) == 25
    assert isinstance(SensorHistoryError("x"), ObservationError)  # the server replies ObservationError


def test_resent_timestamp_with_other_values_is_rejected():
    ts, values = stream(50)
    hist = SensorHistory(C, W, T_S, GAP)
    hist.extend(ts[:30], values[:30])
    changed = values[20:40].copy()
    changed[3, 1] += 1.0  # t = ts[23], already buffered
    with pytest.raises(SensorHistoryError, match=f"t={ts[23]:.6f} was already received with different values"):
        hist.extend(ts[20:40], changed)
    assert len(hist) == 30  # the new samples 30..39 of that request were not added either


def test_duplicate_or_decreasing_timestamps_within_a_request_are_rejected():
    hist = SensorHistory(C, W, T_S, GAP)
    v = np.zeros((3, C), np.float32)
    for bad in ([0.0, 0.1, 0.1], [0.0, 0.2, 0.1]):
        with pytest.raises(SensorHistoryError, match="increase strictly"):
            hist.extend(np.array(bad), v)
    assert len(hist) == 0


def test_time_going_backwards_needs_a_reset_and_reset_clears():
    ts, values = stream(100)
    hist = SensorHistory(C, W, T_S, GAP)
    hist.extend(ts, values)
    hist.window(ts[-1])
    with pytest.raises(SensorHistoryError, match="earlier than the previous query.*reset"):
        hist.window(ts[10])
    with pytest.raises(SensorHistoryError, match="older than the newest"):  # a restarted clock, no reset
        hist.extend(ts[-20:] - ts[-40], values[:20])
    hist.reset()
    assert len(hist) == 0 and hist.newest is None and hist.last_query_t is None
    other = values[:30] + 5.0
    hist.extend(ts[:30], other)  # the clock may restart after a reset; the same stamps, new values
    got = hist.window(ts[29])
    np.testing.assert_array_equal(got[0], one_shot(ts[:30], other, ts[29])[0])  # nothing old survives


def test_history_is_bounded_by_time_and_capacity():
    ts, values = stream(2000)
    hist = SensorHistory(C, W, T_S, GAP, capacity=10_000)
    for i in range(0, 2000, 100):
        hist.extend(ts[i : i + 100], values[i : i + 100])
        hist.window(ts[i + 99])
    assert len(hist) <= int((W + GAP) * 650) + 2  # only what a later window can use
    small = SensorHistory(C, W, T_S, GAP, capacity=16)
    assert small.extend(ts[:10], values[:10]).new == 10
    with pytest.raises(SensorHistoryFullError, match="would hold 100 samples, over its capacity of 16"):
        small.extend(ts[10:100], values[10:100])  # a named refusal, never a silently thinned window
    assert len(small) == 10 and small.newest == ts[9]  # nothing was added
    small.window(ts[9] + W + GAP + 0.05)  # a query later: what no window can use any more is pruned
    assert len(small) == 0 and small.extend(ts[100:116], values[100:116]).new == 16
