"""A real PolicyRunner behind PolicyServer with several concurrent clients: each connection streams its own
episode and gets exactly the actions a local session computes from that episode alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from runner_helpers import obs_from_dataset

from sensorvla.data.dataset import EpisodeDataset
from sensorvla.inference.runner import PolicyRunner
from sensorvla.serving.client import PolicyClient
from sensorvla.serving.protocol import PolicyServerError
from sensorvla.serving.server import PolicyServer

STEPS = 4  # requests per client: consecutive frames of one episode


@pytest.fixture(scope="module")
def ds(checkpoint, synth_dataset_dir):
    runner = PolicyRunner.from_pretrained(checkpoint)
    return EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")


def episode_requests(ds, start: int) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """STEPS consecutive frames from sample `start`: (frame obs without sensor, new sample ts, new values)."""
    out, prev_t = [], None
    e = ds[start]["episode_index"]
    ts_all, values_all = ds.sensor_stream(e)  # the raw stream a robot would have
    values_all = np.asarray(values_all)
    for k in range(STEPS):
        raw = ds[start + k]
        assert raw["episode_index"] == e
        t = raw["timestamp"]
        lo = t - 0.15 if prev_t is None else prev_t
        new = (ts_all > lo) & (ts_all <= t)
        frame = {
            "images": np.stack(raw["images"]),
            "state": raw["state"],
            "timestamp": np.float64(t),
            "instruction": raw["instruction"],
        }
        out.append((frame, ts_all[new], values_all[new].astype(np.float32)))
        prev_t = t
    return out


def starts(ds, n: int) -> list[int]:
    """First sample of n different episodes with a sensor stream and STEPS frames left."""
    picked, seen = [], set()
    for i in range(len(ds) - STEPS):
        raw = ds[i]
        if raw["episode_index"] in seen or not ds.has_sensor(raw["episode_index"]):
            continue
        if ds[i + STEPS - 1]["episode_index"] == raw["episode_index"]:
            picked.append(i + 2)
            seen.add(raw["episode_index"])
        if len(picked) == n:
            return picked
    raise AssertionError("the synthetic dataset has too few sensor episodes")


def test_several_concurrent_clients_stream_their_own_episodes(checkpoint, ds):
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=3, max_vl_age_s=1e9)
    plans = [episode_requests(ds, s) for s in starts(ds, 4)]
    # reference: one local session per episode, sent whole overlapping windows (de-duplicated)
    expected = []
    for plan in plans:
        session, acc_ts, acc_v, outs = runner.new_session(), [], [], []
        for frame, ts, values in plan:
            acc_ts.append(ts)
            acc_v.append(values)
            window = dict(frame, sensor=np.concatenate(acc_v)[-100:], sensor_timestamps=np.concatenate(acc_ts)[-100:])
            outs.append(session.infer(window))
        expected.append(outs)
    got: dict[int, list[dict]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(plans))

    def client_loop(c: int) -> None:
        try:
            with PolicyClient(port=server.port, timeout=120, connect_timeout=30) as client:
                barrier.wait(timeout=60)
                replies = []
                for frame, ts, values in plans[c]:
                    client.stream_sensor(ts, values)  # only the samples new since the last call
                    replies.append(client.infer(frame))
                got[c] = replies
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    with PolicyServer(runner, max_queue=8).start() as server:
        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(len(plans))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    for c, plan in enumerate(plans):
        for k in range(len(plan)):
            np.testing.assert_array_equal(got[c][k]["actions"], expected[c][k]["actions"])
            assert got[c][k]["vl_fresh"] == expected[c][k]["vl_fresh"] == (k % 3 == 0)
            assert got[c][k]["sensor_history"]["missing_points"] == expected[c][k]["sensor_history"]["missing_points"]
    assert server.num_errors == 0 and server.num_requests == len(plans) * STEPS


def test_two_clients_with_different_scenes_never_share_vl_features(checkpoint, ds):
    """Fast-slow with refresh every 100 calls: a shared feature cache would hand B the features of A's images."""
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=100, max_vl_age_s=1e9)
    a, b = obs_from_dataset(ds, 1), obs_from_dataset(ds, len(ds) - 1)
    assert not np.array_equal(a["images"], b["images"])
    want_a = PolicyRunner.from_pretrained(checkpoint).infer(a)["actions"]
    want_b = PolicyRunner.from_pretrained(checkpoint).infer(b)["actions"]
    assert not np.array_equal(want_a, want_b)
    with PolicyServer(runner).start() as server:
        ca = PolicyClient(port=server.port, timeout=120).connect()
        cb = PolicyClient(port=server.port, timeout=120).connect()
        for _ in range(2):
            np.testing.assert_array_equal(ca.infer(a)["actions"], want_a)
            np.testing.assert_array_equal(cb.infer(b)["actions"], want_b)
        ra = ca.infer(a)
        assert not ra["vl_fresh"]  # reused, but A's own features
        ca.reset()  # an episode start: the next call recomputes
        assert ca.infer(a)["vl_fresh"]
        cb.close()
        with PolicyClient(port=server.port, timeout=120) as again:  # a new connection starts fresh
            first = again.infer(b)
            assert first["vl_fresh"]
            np.testing.assert_array_equal(first["actions"], want_b)
        with pytest.raises(PolicyServerError) as info:  # the history is per connection too
            earlier = {k: v for k, v in a.items() if k not in ("sensor", "sensor_timestamps")}  # no new rows
            ca.infer(dict(earlier, timestamp=np.float64(float(a["timestamp"]) - 1.0)))
        assert info.value.type == "ObservationError" and "reset()" in info.value.message
        ca.close()
