"""Fuzz a real server with a real (tiny, untrained) runner: >= 2,000 hypothesis-drawn payloads, each with a
reply timeout. No crash, no hang, no NaN/inf in any reply, no actions for a malformed request."""

from __future__ import annotations

import collections

import pytest
from fuzz_payloads import EXPECTED_ERRORS, FuzzCase, Shape, fuzz_cases, judge, make_fuzz_runner, valid_obs
from hypothesis import HealthCheck, given, settings
from websockets.sync.client import connect

from sensorvla.serving import protocol
from sensorvla.serving.server import PolicyServer

REPLY_TIMEOUT_S = 60  # per request: a hang fails the test instead of stalling the suite
NUM_PAYLOADS = 2000


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_vl_dir, synth_dataset_dir):
    runner = make_fuzz_runner(tiny_vl_dir, synth_dataset_dir, tmp_path_factory.mktemp("fuzz"))
    with PolicyServer(runner, max_queue=2, log_every=10**9, send_traceback=False).start() as server:
        yield server, runner


def send(ws, payload: bytes | str) -> bytes | str:
    ws.send(payload)
    return ws.recv(timeout=REPLY_TIMEOUT_S)


def test_fuzz_2000_payloads_against_a_real_runner(served):
    server, runner = served
    shape = Shape.from_metadata(runner.metadata)
    counts: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    reset = protocol.packb({protocol.CONTROL_KEY: protocol.CONTROL_RESET})
    with connect(f"ws://127.0.0.1:{server.port}", compression=None, proxy=None, max_size=None) as ws:
        ws.recv(timeout=REPLY_TIMEOUT_S)  # handshake

        @settings(
            max_examples=NUM_PAYLOADS,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(case=fuzz_cases(shape))
        def one(case: FuzzCase) -> None:
            assert protocol.unpackb(send(ws, reset)) == {"control": "reset", "ok": True}
            counts[judge(case, send(ws, case.payload))] += 1
            kinds[case.expect] += 1

        one()
        # the server is still healthy and still right after all of it
        good = valid_obs(shape, seed=1, side=32, rows=40)
        send(ws, reset)
        assert judge(FuzzCase("final", "valid", protocol.packb(good)), send(ws, protocol.packb(good))) == "ok"
    assert sum(counts.values()) >= NUM_PAYLOADS
    assert counts["ok"] >= 0.1 * NUM_PAYLOADS and kinds["malformed"] >= 0.5 * NUM_PAYLOADS
    assert kinds["warned"] > 0  # the stale-sensor class ran and every one carried its warning
    assert set(counts) - {"ok"} <= EXPECTED_ERRORS
    assert counts[protocol.BUSY] == 0  # one connection never fills a queue of 2
    assert server.num_errors == sum(n for outcome, n in counts.items() if outcome != "ok")
