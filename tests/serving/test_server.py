"""PolicyServer + PolicyClient on loopback: handshake, /healthz, token, error replies, limits, concurrency."""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from sensorvla.serving import protocol
from sensorvla.serving.client import PolicyClient, PolicyConnectionError, PolicyServerError
from sensorvla.serving.server import PolicyServer

H, D_A = 4, 3


class FakePolicy:
    """Deterministic policy: actions encode (client_id, request_id, sum(state)) so replies can be matched."""

    metadata = {"name": "fake", "action_horizon": H, "action_dim": D_A}
    observation_spec = {
        "images": ((None, 8, 8, 3), "u"),
        "state": ((4,), "f"),
        "sensor": ((None, 5), "f"),
        "timestamp": ((), "f"),
        "instruction": ((), "U"),
        "client_id": ((), "i"),
        "request_id": ((), "i"),
    }

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def infer(self, obs):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if obs["instruction"] == "raise":
                raise RuntimeError("boom: the model failed")
            if obs["instruction"] == "bad output":
                return {"no_actions": 1}
            if obs["instruction"] == "list actions":
                return {"actions": [[0.0] * D_A] * H}
            if obs["instruction"] == "unsendable":
                return {"actions": np.zeros((H, D_A)), "extra": {1, 2}}
            if obs["instruction"] == "slow":
                time.sleep(0.6)
            elif self.delay_s:
                time.sleep(self.delay_s)
            self.calls += 1
            actions = np.zeros((H, D_A), np.float32)
            actions[:, 0] = obs["client_id"]
            actions[:, 1] = obs["request_id"]
            actions[:, 2] = obs["state"].sum() + np.arange(H)
            return {"actions": actions, "timing": {"model_ms": 0.25}, "echo": obs["instruction"]}
        finally:
            with self._lock:
                self.active -= 1


def make_obs(client_id=0, request_id=0, **overrides):
    obs = {
        "images": np.full((2, 8, 8, 3), 7, np.uint8),
        "state": np.array([1.0, 2.0, 3.0, request_id], np.float32),
        "sensor": np.zeros((13, 5), np.float32),
        "timestamp": np.float64(0.5),
        "instruction": "insert",
        "client_id": client_id,
        "request_id": request_id,
    }
    obs.update(overrides)
    return obs


def check_reply(reply, client_id, request_id):
    np.testing.assert_array_equal(reply["actions"][:, 0], client_id)
    np.testing.assert_array_equal(reply["actions"][:, 1], request_id)
    np.testing.assert_allclose(reply["actions"][:, 2], 6.0 + request_id + np.arange(H))


@pytest.fixture
def policy():
    return FakePolicy()


@pytest.fixture
def server(policy):
    srv = PolicyServer(policy, max_message_bytes=256 * 1024).start()
    yield srv
    srv.stop()


def raw_connect(srv, **kw):
    return connect(f"ws://127.0.0.1:{srv.port}", compression=None, proxy=None, open_timeout=5, **kw)


def test_round_trip_handshake_and_timing(server, policy, caplog):
    caplog.set_level(logging.INFO, logger="sensorvla.serving.server")
    with PolicyClient(port=server.port, timeout=5, connect_timeout=5) as client:
        meta = client.metadata
        assert meta["name"] == "fake" and meta["action_horizon"] == H
        assert meta["protocol"]["max_message_bytes"] == 256 * 1024
        assert protocol.spec_from_json(meta["protocol"]["observation_spec"]) == FakePolicy.observation_spec
        reply = client.infer(make_obs(client_id=3, request_id=9))
    check_reply(reply, 3, 9)
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (H, D_A)
    assert reply["timing"] == {"model_ms": 0.25} and reply["echo"] == "insert"
    st = reply["server_timing"]
    assert set(st) == {"infer_ms", "queue_ms", "total_ms"} and 0 <= st["infer_ms"] <= st["total_ms"]
    assert policy.calls == 1 and server.num_requests == 1 and server.num_errors == 0
    assert any(re.match(r"request 1 \(conn 1 #1\): infer [\d.]+ ms, queue", r.getMessage()) for r in caplog.records)


def test_healthz_is_plain_http_200(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
        assert resp.status == 200 and resp.read() == b"ok"


def test_token_accepted_rejected_and_healthz_open(policy):
    with PolicyServer(policy, token="s3cret").start() as srv:
        with PolicyClient(port=srv.port, token="s3cret", timeout=5, connect_timeout=5) as client:
            check_reply(client.infer(make_obs(1, 2)), 1, 2)
        # the query-string form works too
        with connect(f"ws://127.0.0.1:{srv.port}/?token=s3cret", proxy=None, open_timeout=5) as ws:
            assert protocol.unpackb(ws.recv(timeout=5))["name"] == "fake"
        for token in ("wrong", None):
            t0 = time.monotonic()
            with pytest.raises(PolicyServerError) as info:
                PolicyClient(port=srv.port, token=token, connect_timeout=5).connect()
            assert info.value.type == "Unauthorized" and "token" in info.value.message
            assert time.monotonic() - t0 < 2.0  # no retry loop on a 401
        with pytest.raises(InvalidStatus) as status:
            connect(f"ws://127.0.0.1:{srv.port}", proxy=None, open_timeout=5)
        assert status.value.response.status_code == 401
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=5) as resp:
            assert resp.status == 200
        assert policy.calls == 1


GOOD = protocol.packb(make_obs(0, 1))
BAD_REQUESTS = {
    "missing key": (
        protocol.packb({k: v for k, v in make_obs().items() if k != "sensor"}),
        "ObservationError",
        "missing observation key(s) ['sensor']",
    ),
    "wrong key": (
        protocol.packb({("sensr" if k == "sensor" else k): v for k, v in make_obs().items()}),
        "ObservationError",
        "did you mean 'sensor'",
    ),
    "wrong shape": (
        protocol.packb(make_obs(state=np.zeros(5, np.float32))),
        "ObservationError",
        "'state': expected shape (4,), got (5,)",
    ),
    "wrong dtype": (
        protocol.packb(make_obs(images=np.zeros((2, 8, 8, 3), np.float32))),
        "ObservationError",
        "'images': expected dtype kind 'u', got float32",
    ),
    "nan": (
        protocol.packb(make_obs(sensor=np.full((13, 5), np.nan, np.float32))),
        "ObservationError",
        "'sensor': 65 non-finite",
    ),
    "inf": (
        protocol.packb(make_obs(timestamp=np.float64(np.inf))),
        "ObservationError",
        "'timestamp': 1 non-finite",
    ),
    "not msgpack": (b"\xc1\xc1\xc1 definitely not msgpack", "InvalidMessage", "could not decode"),
    "truncated": (GOOD[:-17], "InvalidMessage", "could not decode"),
    "text frame": ("hello, policy", "InvalidMessage", "text frame"),
    "not a map": (protocol.packb([1, 2, 3]), "ObservationError", "must be a map"),
    "policy raises": (
        protocol.packb(make_obs(instruction="raise")),
        "RuntimeError",
        "boom: the model failed",
    ),
    "list actions": (
        protocol.packb(make_obs(instruction="list actions")),
        "InvalidPolicyOutput",
        "return a numpy array (H, D_a)",
    ),
    "unsendable output": (
        protocol.packb(make_obs(instruction="unsendable")),
        "InvalidPolicyOutput",
        "the policy's reply cannot be sent",
    ),
    "bad policy output": (
        protocol.packb(make_obs(instruction="bad output")),
        "InvalidPolicyOutput",
        "must return a dict with 'actions'",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_error_reply_and_connection_keeps_serving(server, name):
    payload, err_type, fragment = BAD_REQUESTS[name]
    with raw_connect(server) as ws:
        ws.recv(timeout=5)  # handshake
        ws.send(payload)
        reply = protocol.unpackb(ws.recv(timeout=5))
        assert set(reply) == {"error"}
        assert reply["error"]["type"] == err_type
        assert fragment in reply["error"]["message"]
        assert ("traceback" in reply["error"]) == (name == "policy raises")
        ws.send(GOOD)  # same connection, next good request
        check_reply(protocol.unpackb(ws.recv(timeout=5)), 0, 1)
    assert server.num_errors == 1 and server.num_requests == 2


def test_client_raises_server_errors_and_keeps_working(server):
    with PolicyClient(port=server.port, timeout=5, connect_timeout=5) as client:
        with pytest.raises(PolicyServerError) as info:
            client.infer(make_obs(state=np.zeros(3, np.float32)))
        assert info.value.type == "ObservationError" and "expected shape (4,)" in info.value.message
        with pytest.raises(PolicyServerError) as info:
            client.infer(make_obs(instruction="raise"))
        assert info.value.type == "RuntimeError" and "boom" in str(info.value)
        assert "Traceback" in info.value.traceback
        check_reply(client.infer(make_obs(2, 5)), 2, 5)


def test_oversized_message_closes_1009_and_server_keeps_serving(server, policy):
    big = make_obs(sensor=np.zeros((20_000, 5), np.float32))  # 400 kB > 256 kB
    with PolicyClient(port=server.port, timeout=5, connect_timeout=5) as bystander:
        with raw_connect(server) as ws:
            ws.recv(timeout=5)
            with pytest.raises(ConnectionClosed) as closed:
                ws.send(protocol.packb(big))
                ws.recv(timeout=5)
            assert closed.value.rcvd.code == protocol.CLOSE_MESSAGE_TOO_BIG
        check_reply(bystander.infer(make_obs(1, 1)), 1, 1)  # an open connection is unaffected
        # the client refuses before sending, using the limit from the handshake
        with pytest.raises(PolicyServerError) as info:
            bystander.infer(big)
        assert info.value.type == "MessageTooLarge" and "max_message_bytes=262144" in info.value.message
        check_reply(bystander.infer(make_obs(1, 2)), 1, 2)
    with PolicyClient(port=server.port, timeout=5, connect_timeout=5) as fresh:  # and new ones too
        check_reply(fresh.infer(make_obs(4, 4)), 4, 4)
    assert policy.calls == 3


def test_concurrent_clients_get_their_own_replies_in_order():
    policy = FakePolicy(delay_s=0.0005)
    num_clients, num_requests = 4, 50
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(cid: int):
        try:
            with PolicyClient(port=srv.port, timeout=10, connect_timeout=10) as client:
                results[cid] = [client.infer(make_obs(cid, rid))["actions"] for rid in range(num_requests)]
        except BaseException as exc:  # surfaced below; a thread must not swallow it
            errors.append(exc)

    with PolicyServer(policy).start() as srv:
        threads = [threading.Thread(target=worker, args=(c,)) for c in range(num_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "client threads did not finish"
    assert not errors, errors
    for cid in range(num_clients):
        got = np.stack(results[cid])  # (num_requests, H, D_a), in send order
        np.testing.assert_array_equal(got[:, :, 0], cid)
        np.testing.assert_array_equal(got[:, :, 1], np.repeat(np.arange(num_requests)[:, None], H, axis=1))
    assert policy.calls == num_clients * num_requests and srv.num_requests == num_clients * num_requests
    assert policy.max_active == 1  # one model: never two infer calls at once


def test_event_loop_stays_responsive_during_slow_inference(server, policy):
    client = PolicyClient(port=server.port, timeout=5, connect_timeout=5)
    slow = threading.Thread(target=lambda: client.infer(make_obs(instruction="slow")))
    slow.start()
    deadline = time.monotonic() + 5
    while policy.active == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert policy.active == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with PolicyClient(port=server.port, timeout=5, connect_timeout=5) as other:
        assert other.metadata["name"] == "fake"  # handshakes are served too
    assert policy.active == 1  # ...while infer (0.6 s sleep) is still running in the worker thread
    slow.join(timeout=5)
    client.close()


def test_client_timeout_then_reconnects(server):
    client = PolicyClient(port=server.port, timeout=0.2, connect_timeout=5)
    with pytest.raises(TimeoutError, match="no reply"):
        client.infer(make_obs(instruction="slow"))
    client.timeout = 5
    check_reply(client.infer(make_obs(0, 7)), 0, 7)  # fresh connection: the late reply cannot leak in
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_until_server_is_up_and_fails_bounded(policy):
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(PolicyConnectionError, match="sensorvla serve"):
        PolicyClient(port=port, connect_timeout=0.3).connect()
    assert time.monotonic() - t0 < 2.0
    srv = PolicyServer(policy, port=port)
    starter = threading.Timer(0.3, srv.start)
    starter.start()
    try:
        with PolicyClient(port=port, timeout=5, connect_timeout=5) as client:
            check_reply(client.infer(make_obs(0, 0)), 0, 0)
    finally:
        starter.join()
        srv.stop()


def test_start_fails_loudly_when_port_taken_and_stop_frees_port(policy):
    with PolicyServer(policy).start() as srv:
        with pytest.raises(OSError):
            PolicyServer(policy, port=srv.port).start()
        port = srv.port
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_client_imports_without_torch():
    code = "import sys; import sensorvla.serving.client; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_constructor_fails_fast_on_bad_policy_description():
    class Bad(FakePolicy):
        observation_spec = {"state": ((4,), "float33")}

    with pytest.raises(ValueError, match=r"observation_spec\['state'\]: 'float33' is not a numpy dtype"):
        PolicyServer(Bad())

    class BadMeta(FakePolicy):
        metadata = {"created": object()}

    with pytest.raises(TypeError, match="policy.metadata must be msgpack-serializable"):
        PolicyServer(BadMeta())

    class Clash(FakePolicy):
        metadata = {"protocol": 1}

    with pytest.raises(ValueError, match="must not use the key 'protocol'"):
        PolicyServer(Clash())


def wait_healthy(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_run_forever_serves_until_stop(policy):
    srv = PolicyServer(policy, port=free_port())
    thread = threading.Thread(target=srv.run_forever, daemon=True)
    thread.start()
    wait_healthy(srv.port)
    with PolicyClient(port=srv.port, timeout=5, connect_timeout=5) as client:
        check_reply(client.infer(make_obs(1, 3)), 1, 3)
    srv.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


SERVE_SCRIPT = """
import numpy as np
from sensorvla.serving.server import serve_forever

class Echo:
    metadata = {{"name": "echo"}}
    observation_spec = {{"state": ((4,), "f")}}

    def infer(self, obs):
        return {{"actions": np.tile(obs["state"], (2, 1))}}

serve_forever(Echo(), port={port})
print("clean exit")
"""


def test_serve_forever_exits_cleanly_on_sigterm():
    port = free_port()
    cmd = [sys.executable, "-c", SERVE_SCRIPT.format(port=port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(port)
        with PolicyClient(port=port, timeout=5, connect_timeout=5) as client:
            assert client.metadata["name"] == "echo"
            state = np.array([1, 2, 3, 4], np.float32)
            np.testing.assert_array_equal(client.infer({"state": state})["actions"], [state, state])
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode == 0, err
    assert "clean exit" in out
