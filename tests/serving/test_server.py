"""PolicyServer + PolicyClient on loopback: handshake, /healthz, tokens (Bearer, Api-Key), error replies,
limits, a bounded queue, per-connection sessions, sensor streaming and concurrency. No assertion reads a
clock: slow inference is a policy blocked on an event the test releases."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

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
        self.started = threading.Event()  # set when a "block" request is running
        self.release = threading.Event()  # a "block" request returns once the test sets this

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
            if obs["instruction"] == "nan actions":
                return {"actions": np.full((H, D_A), np.nan, np.float32)}
            if obs["instruction"] == "inf timing":
                return {"actions": np.zeros((H, D_A), np.float32), "timing": {"model_ms": float("inf")}}
            if obs["instruction"] == "block":
                self.started.set()
                assert self.release.wait(timeout=60), "the test never released the blocked request"
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


def test_client_and_server_share_one_endpoint(policy):
    """Both ends hold a `protocol.Endpoint` (host, port, token, size limit); an IPv6 literal is bracketed."""
    client = PolicyClient("::1", 8000, token="t")
    assert client.endpoint == protocol.Endpoint("::1", 8000, "t", protocol.DEFAULT_MAX_MESSAGE_BYTES)
    assert client.uri == "ws://[::1]:8000" and protocol.ws_uri("[::1]", 1) == "ws://[::1]:1"
    srv = PolicyServer(policy, token="t", max_message_bytes=1024)
    assert srv.endpoint == protocol.Endpoint("127.0.0.1", 0, "t", 1024) and srv.url == "ws://127.0.0.1:0"


def test_healthz_is_plain_http_200(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
        assert resp.status == 200 and resp.read() == b"ok"


def rejections(caplog) -> int:
    return sum("rejected connection" in r.getMessage() for r in caplog.records)


def test_token_accepted_rejected_and_healthz_open(policy, caplog):
    caplog.set_level(logging.WARNING, logger="sensorvla.serving.server")
    with PolicyServer(policy, token="s3cret").start() as srv:
        with PolicyClient(port=srv.port, token="s3cret", timeout=5, connect_timeout=5) as client:
            check_reply(client.infer(make_obs(1, 2)), 1, 2)
        # the query-string form works too
        with connect(f"ws://127.0.0.1:{srv.port}/?token=s3cret", proxy=None, open_timeout=5) as ws:
            assert protocol.unpackb(ws.recv(timeout=5))["name"] == "fake"
        for token in ("wrong", None):
            before = rejections(caplog)
            with pytest.raises(PolicyServerError) as info:
                PolicyClient(port=srv.port, token=token, connect_timeout=60).connect()
            assert info.value.type == "Unauthorized" and "token" in info.value.message
            assert rejections(caplog) == before + 1  # one attempt: no retry loop on a 401
        with pytest.raises(InvalidStatus) as status:
            connect(f"ws://127.0.0.1:{srv.port}", proxy=None, open_timeout=5)
        assert status.value.response.status_code == 401
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=5) as resp:
            assert resp.status == 200
        assert policy.calls == 1


def openpi_style_connect(port: int, api_key: str | None):
    """Exactly what openpi_client.WebsocketClientPolicy(host, port, api_key) does to connect (0.1.2)."""
    headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
    return connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, additional_headers=headers, proxy=None)


def test_openpi_api_key_header_is_accepted_and_a_wrong_one_refused(policy):
    with PolicyServer(policy, token="s3cret").start() as srv:
        with openpi_style_connect(srv.port, "s3cret") as ws:
            assert protocol.unpackb(ws.recv(timeout=5))["name"] == "fake"
            ws.send(protocol.packb(make_obs(2, 3)))
            check_reply(protocol.unpackb(ws.recv(timeout=5)), 2, 3)
        for key in ("wrong", None):
            with pytest.raises(InvalidStatus) as status:
                openpi_style_connect(srv.port, key)
            assert status.value.response.status_code == 401
            assert b"Api-Key" in status.value.response.body


OPENPI_SCRIPT = """
import json, sys
import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

policy = WebsocketClientPolicy("127.0.0.1", int(sys.argv[1]), api_key=sys.argv[2])
obs = {
    "images": np.full((2, 8, 8, 3), 7, np.uint8), "state": np.array([1.0, 2.0, 3.0, 4.0], np.float32),
    "sensor": np.zeros((13, 5), np.float32), "timestamp": np.float64(0.5), "instruction": "insert",
    "client_id": 5, "request_id": 4,
}
reply = policy.infer(obs)
errors = []
from openpi_client.action_chunk_broker import ActionChunkBroker
for client in (policy, ActionChunkBroker(policy, action_horizon=4)):  # an error is never an action chunk
    try:
        client.infer({**obs, "state": np.zeros(3, np.float32)})
    except RuntimeError as exc:
        errors.append(str(exc))
name = policy.get_server_metadata()["name"]
print(json.dumps({"name": name, "actions": reply["actions"].tolist(), "errors": errors}))
"""


@pytest.mark.interop
@pytest.mark.skipif(
    not os.environ.get("SENSORVLA_OPENPI_PYTHON"),
    reason="set SENSORVLA_OPENPI_PYTHON to a python with `pip install openpi-client` (it pins numpy<2, so it "
    "lives in its own venv)",
)
def test_real_openpi_client_with_api_key(policy):
    import json

    with PolicyServer(policy, token="s3cret").start() as srv:
        cmd = [os.environ["SENSORVLA_OPENPI_PYTHON"], "-c", OPENPI_SCRIPT, str(srv.port), "s3cret"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "fake"
    check_reply({"actions": np.asarray(out["actions"])}, 5, 4)
    assert len(out["errors"]) == 2 and all("ObservationError" in e for e in out["errors"])


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
    "nan actions": (
        protocol.packb(make_obs(instruction="nan actions")),
        "NonFiniteOutput",
        "NaN/inf at reply['actions']",
    ),
    "inf in the reply": (
        protocol.packb(make_obs(instruction="inf timing")),
        "NonFiniteOutput",
        "reply['timing']['model_ms']",
    ),
    "unknown control command": (
        protocol.packb({"__control__": "reboot"}),
        "InvalidMessage",
        "unknown control command 'reboot'",
    ),
    "float64 images": (
        protocol.packb(make_obs(images=np.zeros((2, 8, 8, 3), np.float64))),
        "ObservationError",
        "'images': expected dtype kind 'u'",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_error_reply_and_connection_keeps_serving(server, name):
    payload, err_type, fragment = BAD_REQUESTS[name]
    with raw_connect(server) as ws:
        ws.recv(timeout=5)  # handshake
        ws.send(payload)
        frame = ws.recv(timeout=5)
        assert isinstance(frame, str)  # errors are text frames: openpi's client raises on them
        reply = protocol.decode_reply(frame)
        assert set(reply) == {"error"}
        assert reply["error"]["type"] == err_type
        assert fragment in reply["error"]["message"]
        assert "traceback" not in reply["error"]  # only with send_traceback=True (`serve --debug`)
        ws.send(GOOD)  # same connection, next good request
        check_reply(protocol.unpackb(ws.recv(timeout=5)), 0, 1)
    assert server.num_errors == 1 and server.num_requests == 2


def test_client_raises_server_errors_and_keeps_working(policy):
    with (
        PolicyServer(policy, send_traceback=True).start() as server,
        PolicyClient(port=server.port, timeout=5, connect_timeout=5) as client,
    ):
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
    client = PolicyClient(port=server.port, timeout=60, connect_timeout=5)
    replies: list = []
    slow = threading.Thread(target=lambda: replies.append(client.infer(make_obs(instruction="block"))))
    slow.start()
    assert policy.started.wait(timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with PolicyClient(port=server.port, timeout=5, connect_timeout=5) as other:
        assert other.metadata["name"] == "fake"  # handshakes are served too
    assert policy.active == 1 and not replies  # ...while infer is still blocked in the worker thread
    policy.release.set()
    slow.join(timeout=30)
    assert len(replies) == 1 and replies[0]["echo"] == "block"
    client.close()


def test_client_timeout_then_reconnects(server, policy):
    client = PolicyClient(port=server.port, timeout=0.2, connect_timeout=5)
    with pytest.raises(TimeoutError, match="no reply"):
        client.infer(make_obs(instruction="block"))  # blocked until released: the timeout must fire
    policy.release.set()
    client.timeout = 5
    check_reply(client.infer(make_obs(0, 7)), 0, 7)  # fresh connection: the late reply cannot leak in
    client.close()


def test_full_queue_answers_busy_at_once_and_nobody_hangs():
    """max_queue=2: one request runs (blocked), one waits; the rest get Busy while the worker is still
    blocked, i.e. without waiting for any inference. After the release everyone is served."""
    policy = FakePolicy()
    with PolicyServer(policy, max_queue=2).start() as srv:
        first = PolicyClient(port=srv.port, timeout=60, connect_timeout=5).connect()
        second = PolicyClient(port=srv.port, timeout=60, connect_timeout=5).connect()
        results: dict[str, Any] = {}
        t1 = threading.Thread(target=lambda: results.update(a=first.infer(make_obs(1, 1, instruction="block"))))
        t1.start()
        assert policy.started.wait(timeout=30)
        t2 = threading.Thread(target=lambda: results.update(b=second.infer(make_obs(2, 2))))
        t2.start()
        wait_for(lambda: srv._pending == 2)  # noqa: SLF001 - the second request is queued
        busy = []
        for cid in range(3, 8):
            with PolicyClient(port=srv.port, timeout=30, connect_timeout=5) as c:
                with pytest.raises(PolicyServerError) as info:
                    c.infer(make_obs(cid, 0))
                busy.append(info.value)
        assert all(e.type == "Busy" and "max_queue=2" in e.message for e in busy)
        assert not results and policy.active == 1 and policy.calls == 0  # answered while the model was blocked
        policy.release.set()
        t1.join(timeout=30)
        t2.join(timeout=30)
        check_reply(results["a"], 1, 1)
        check_reply(results["b"], 2, 2)
        with PolicyClient(port=srv.port, timeout=30, connect_timeout=5) as c:  # a retry now succeeds
            check_reply(c.infer(make_obs(3, 0)), 3, 0)
        assert srv.num_busy == 5 and policy.calls == 3
        first.close()
        second.close()


def wait_for(predicate, timeout: float = 30.0) -> None:
    """Poll `predicate` until true; fail (not hang) after `timeout` s. A bound on waiting, not an assertion
    on how long anything took."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_until_server_is_up_and_fails_bounded(policy, monkeypatch):
    import sensorvla.serving.client as client_module

    port = free_port()
    with pytest.raises(PolicyConnectionError, match=r"sensorvla serve.*|attempts") as info:
        PolicyClient(port=port, connect_timeout=0.3).connect()
    assert re.search(r"within 0.3s \(\d+ attempts", str(info.value))  # gave up by itself, after retrying
    attempts, failed_once = [], threading.Event()
    real_connect = client_module.connect

    def counting_connect(*args, **kwargs):
        attempts.append(1)
        try:
            return real_connect(*args, **kwargs)
        except OSError:
            failed_once.set()
            raise

    monkeypatch.setattr(client_module, "connect", counting_connect)
    srv = PolicyServer(policy, port=port)
    starter = threading.Thread(target=lambda: (failed_once.wait(timeout=30), srv.start()))
    starter.start()  # the server comes up only after the client has failed at least once
    try:
        with PolicyClient(port=port, timeout=5, connect_timeout=60) as client:
            check_reply(client.infer(make_obs(0, 0)), 0, 0)
        assert len(attempts) >= 2
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


class SessionPolicy:
    """A policy with per-connection sessions and a pre-queue check, recording what each session saw."""

    metadata = {"name": "sessions"}
    observation_spec = {"sensor": ((None, 2), "f"), "sensor_timestamps": ((None,), "f"), "instruction": ((), "U")}

    def __init__(self):
        self.sessions: list[FakeSession] = []
        self.checked = 0

    def check_request(self, obs):
        self.checked += 1
        if obs["instruction"] == "too long":
            raise protocol.LimitExceededError("'instruction' has 9999 tokens, over max_instruction_tokens=256")
        return obs

    def new_session(self):
        self.sessions.append(FakeSession())
        return self.sessions[-1]

    def infer(self, obs):
        raise AssertionError("with new_session the server must call the session's infer")


class FakeSession:
    def __init__(self):
        self.ts: list[float] = []
        self.resets = 0
        self.calls = 0
        self.closed = threading.Event()

    def infer(self, obs):
        self.calls += 1
        if obs["instruction"] == "reject in infer":  # e.g. an out-of-order sample found against the history
            raise protocol.ObservationError("sensor sample at t=0.1 is older than the newest buffered sample")
        self.ts.extend(obs["sensor_timestamps"].tolist())
        return {"actions": np.array([[len(self.ts), len(obs["sensor_timestamps"])]], np.float32)}

    def reset(self):
        self.resets += 1
        self.ts = []

    def close(self):
        self.closed.set()


def test_each_connection_has_its_own_session_reset_and_closed():
    policy = SessionPolicy()
    with PolicyServer(policy).start() as srv:
        a = PolicyClient(port=srv.port, timeout=5, connect_timeout=5).connect()
        b = PolicyClient(port=srv.port, timeout=5, connect_timeout=5).connect()
        a.stream_sensor([0.1, 0.2], np.zeros((2, 2)))
        b.stream_sensor([5.0], np.ones((1, 2)))
        ra, rb = a.infer({"instruction": "go"}), b.infer({"instruction": "go"})
        assert ra["actions"].tolist() == [[2, 2]] and rb["actions"].tolist() == [[1, 1]]
        assert a.pending_sensor_samples == 0
        ra = a.infer({"instruction": "go"})  # nothing new: zero rows, the session keeps its history
        assert ra["actions"].tolist() == [[2, 0]]
        sa, sb = policy.sessions
        assert sa.ts == [0.1, 0.2] and sb.ts == [5.0]
        a.stream_sensor([0.3], np.zeros((1, 2)))
        a.reset()  # the server session and the unsent samples
        assert sa.resets == 1 and sa.ts == [] and a.pending_sensor_samples == 0 and sb.resets == 0
        a.stream_sensor([0.0], np.zeros((1, 2)))  # after a reset the clock may restart
        assert a.infer({"instruction": "go"})["actions"].tolist() == [[1, 1]]
        a.close()
        assert sa.closed.wait(timeout=30)
        with PolicyClient(port=srv.port, timeout=5, connect_timeout=5) as again:
            again.stream_sensor([9.0], np.zeros((1, 2)))
            assert again.infer({"instruction": "go"})["actions"].tolist() == [[1, 1]]  # a fresh session
        assert len(policy.sessions) == 3 and not sb.closed.is_set()
        b.close()


def test_check_request_rejects_before_the_queue_and_session_errors_are_observation_errors():
    policy = SessionPolicy()
    with PolicyServer(policy).start() as srv, PolicyClient(port=srv.port, timeout=5, connect_timeout=5) as c:
        empty = {"sensor": np.zeros((0, 2), np.float32), "sensor_timestamps": np.zeros(0)}
        with pytest.raises(PolicyServerError) as info:
            c.infer({**empty, "instruction": "too long"})
        assert info.value.type == "LimitExceeded" and "max_instruction_tokens" in info.value.message
        assert policy.sessions[0].calls == 0  # never reached the session (or the model)
        with pytest.raises(PolicyServerError) as info:
            c.infer({**empty, "instruction": "reject in infer"})
        assert info.value.type == "ObservationError" and info.value.traceback is None  # the request's fault
        assert c.infer({**empty, "instruction": "go"})["actions"].tolist() == [[0, 0]]


def test_stream_sensor_validates_locally_and_refuses_mixing():
    client = PolicyClient(port=free_port())  # no connection is made by any of these
    with pytest.raises(ValueError, match="increase strictly"):
        client.stream_sensor([0.2, 0.1], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="N = len"):
        client.stream_sensor([0.1, 0.2], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN or inf"):
        client.stream_sensor([0.1], np.full((1, 2), 1e300))  # inf as float32
    client.stream_sensor([0.1, 0.2], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not newer"):
        client.stream_sensor([0.2], np.zeros((1, 2)))
    with pytest.raises(ValueError, match="3 channels, earlier samples had 2"):
        client.stream_sensor([0.3], np.zeros((1, 3)))
    assert client.pending_sensor_samples == 2
    with pytest.raises(ValueError, match="use one or the other"):
        client._with_stream({"sensor": np.zeros((1, 2)), "sensor_timestamps": np.zeros(1)})  # noqa: SLF001
    client.reset()  # not connected: only the local buffer
    assert client.pending_sensor_samples == 0


def test_streamed_samples_survive_a_busy_reply():
    policy = FakePolicy()
    with PolicyServer(SessionWrapped(policy), max_queue=1).start() as srv:
        blocker = PolicyClient(port=srv.port, timeout=60, connect_timeout=5).connect()
        blocked = make_obs(instruction="block", sensor_timestamps=np.arange(13.0))
        t = threading.Thread(target=lambda: blocker.infer(blocked))
        t.start()
        assert policy.started.wait(timeout=30)
        with PolicyClient(port=srv.port, timeout=30, connect_timeout=5) as c:
            c.stream_sensor([0.1, 0.2], np.zeros((2, 5)))
            no_sensor = {k: v for k, v in make_obs(1, 1).items() if k != "sensor"}
            with pytest.raises(PolicyServerError, match="Busy"):
                c.infer(no_sensor)
            assert c.pending_sensor_samples == 2  # kept for the retry
            policy.release.set()
            t.join(timeout=30)
            reply = c.infer(no_sensor)
            assert reply["rows"] == 2 and c.pending_sensor_samples == 0
        blocker.close()


class SessionWrapped:
    """FakePolicy whose spec also carries sensor timestamps; reports how many sensor rows arrived."""

    metadata = FakePolicy.metadata
    observation_spec = {**FakePolicy.observation_spec, "sensor_timestamps": ((None,), "f")}

    def __init__(self, inner: FakePolicy):
        self.inner = inner

    def infer(self, obs):
        out = self.inner.infer(obs)
        out["rows"] = len(obs["sensor_timestamps"])
        return out


# --- issue 19: bounded decoding off the event loop, memory bounds, auth, openpi errors, shutdown -------------


class CheckingPolicy(FakePolicy):
    """FakePolicy with a pre-queue `check_request` that holds requests saying "hold in check" until released."""

    def __init__(self):
        super().__init__()
        self.in_check = threading.Semaphore(0)  # released once per request that reached the hold
        self.let_check_go = threading.Event()

    def check_request(self, obs):
        if obs["instruction"] == "hold in check":
            self.in_check.release()
            assert self.let_check_go.wait(timeout=60), "the test never released the held check"
        return obs


def test_validation_runs_off_the_event_loop_so_other_clients_are_served():
    """While one request sits in decoding/validation, a second client connects, is served and /healthz answers.
    Ordering, not timing: the held request is released only after the others completed."""
    policy = CheckingPolicy()
    with PolicyServer(policy).start() as srv:
        held = PolicyClient(port=srv.port, timeout=60, connect_timeout=5).connect()
        replies: list = []
        thread = threading.Thread(
            target=lambda: replies.append(held.infer(make_obs(1, 1, instruction="hold in check")))
        )
        thread.start()
        assert policy.in_check.acquire(timeout=30)  # the first request is inside check_request now
        with PolicyClient(port=srv.port, timeout=30, connect_timeout=5) as other:
            check_reply(other.infer(make_obs(2, 2)), 2, 2)
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=30) as resp:
            assert resp.status == 200
        assert not replies and policy.calls == 1  # ...and the held one is still held
        policy.let_check_go.set()
        thread.join(timeout=30)
        check_reply(replies[0], 1, 1)
        held.close()


def test_msgpack_decoding_runs_off_the_event_loop(monkeypatch):
    """The decoder itself (not only the checks) runs on a decode thread: a frame held inside `unpackb` does not
    stop another client's request."""
    policy = FakePolicy()
    marker = protocol.packb(make_obs(9, 9, instruction="held in the decoder"))
    entered, go = threading.Event(), threading.Event()
    real_unpackb = protocol.unpackb

    def slow_unpackb(data, limits=None):
        if data == marker:
            entered.set()
            assert go.wait(timeout=60)
        return real_unpackb(data, limits)

    monkeypatch.setattr(protocol, "unpackb", slow_unpackb)
    with PolicyServer(policy).start() as srv, raw_connect(srv) as ws:
        ws.recv(timeout=5)
        ws.send(marker)
        assert entered.wait(timeout=30)
        with PolicyClient(port=srv.port, timeout=30, connect_timeout=5) as other:
            check_reply(other.infer(make_obs(3, 3)), 3, 3)
        go.set()
        check_reply(protocol.decode_reply(ws.recv(timeout=30)), 9, 9)


def _header_only(kind: str, n: int) -> bytes:
    """A msgpack frame that announces n elements (or bytes) and holds almost none: the decoder must refuse it
    at the header."""
    head = {"map": b"\xdf", "array": b"\xdd", "str": b"\xdb"}[kind]
    return head + n.to_bytes(4, "big") + b"\x00" * 16


HOSTILE_FRAMES = {
    # the measured cases of issue 19, built small where the header alone is the attack
    "1,000,000 unknown keys": (lambda: _header_only("map", 1_000_000), "max_map_len=64"),
    "200,000 real unknown keys": (
        lambda: protocol.packb({**make_obs(), **{f"k{i}": 0 for i in range(200_000)}}),
        "max_map_len=64",
    ),
    "1M-character key (sent)": (lambda: protocol.packb({**make_obs(), "k" * 1_000_000: 1}), "max_str_len="),
    "30M-int state list": (lambda: protocol.packb({**make_obs(), "state": _Header(30_000_000)}), "max_array_len="),
    "nested small lists": (
        lambda: protocol.packb({**make_obs(), "state": [[0]] * 12_000}),
        "max_items=",
    ),
}


class _Header:
    """Packs as the header of an n-element int list followed by a few elements (protocol.packb's default hook
    cannot express this, so the frame is patched after packing)."""

    def __init__(self, n: int):
        self.n = n


def _pack_hostile(name: str) -> bytes:
    build, _ = HOSTILE_FRAMES[name]
    if name == "30M-int state list":
        base = protocol.packb({**make_obs(), "state": "PLACEHOLDER"})
        return base.replace(b"\xabPLACEHOLDER", b"\xdd" + (30_000_000).to_bytes(4, "big") + b"\x01" * 64)
    return build()


@pytest.mark.parametrize("name", list(HOSTILE_FRAMES))
def test_hostile_frames_are_refused_at_the_header_with_a_bounded_reply(name):
    policy = FakePolicy()
    with PolicyServer(policy, max_message_bytes=32 * 2**20).start() as srv, raw_connect(srv, max_size=None) as ws:
        ws.recv(timeout=5)
        ws.send(_pack_hostile(name))
        frame = ws.recv(timeout=60)
        reply = protocol.decode_reply(frame)
        assert reply["error"]["type"] == "LimitExceeded", reply
        assert HOSTILE_FRAMES[name][1] in reply["error"]["message"]
        assert len(frame) < 2000  # the reply never echoes what was sent
        ws.send(GOOD)
        check_reply(protocol.decode_reply(ws.recv(timeout=30)), 0, 1)
    assert policy.calls == 1


def test_inflight_budget_unit():
    from sensorvla.serving.server import InflightBudget

    budget = InflightBudget(100)
    assert budget.try_acquire(60) and not budget.try_acquire(41) and budget.try_acquire(40)
    assert budget.in_use == 100 and budget.peak == 100
    budget.release(60)
    assert budget.try_acquire(60) and budget.in_use == 100
    budget.release(100)
    with pytest.raises(RuntimeError, match="released more bytes"):
        budget.release(1)
    with pytest.raises(ValueError, match="max_inflight_bytes=10 must be >= max_message_bytes=20"):
        PolicyServer(FakePolicy(), max_message_bytes=20, max_inflight_bytes=10)


def test_frames_beyond_the_inflight_budget_are_refused_busy_and_the_budget_returns_to_zero():
    """Two frames held in validation fill the budget; a third is answered Busy naming the budget at once (without
    being decoded); after the release every byte is returned and a retry succeeds."""
    policy = CheckingPolicy()
    frame = len(protocol.packb(make_obs(1, 1, instruction="hold in check")))
    budget = 2 * frame + frame // 2
    with PolicyServer(policy, max_message_bytes=budget, max_inflight_bytes=budget, decode_workers=2).start() as srv:
        clients = [PolicyClient(port=srv.port, timeout=60, connect_timeout=5).connect() for _ in range(2)]
        replies: dict[int, Any] = {}
        threads = [
            threading.Thread(
                target=lambda i=i, c=c: replies.update({i: c.infer(make_obs(i, 1, instruction="hold in check"))})
            )
            for i, c in enumerate(clients)
        ]
        for t in threads:
            t.start()
        assert policy.in_check.acquire(timeout=30) and policy.in_check.acquire(timeout=30)  # both held
        assert srv.budget.in_use == 2 * frame
        with PolicyClient(port=srv.port, timeout=30, connect_timeout=5) as third:
            with pytest.raises(PolicyServerError) as info:
                third.infer(make_obs(3, 3, instruction="hold in check"))
            assert info.value.type == "Busy" and f"max_inflight_bytes={2 * frame + frame // 2}" in info.value.message
            policy.let_check_go.set()
            for t in threads:
                t.join(timeout=30)
            check_reply(third.infer(make_obs(3, 4)), 3, 4)
        assert sorted(replies) == [0, 1] and srv.budget.in_use == 0 and srv.budget.peak == 2 * frame
        for c in clients:
            c.close()


def test_connection_cap_refuses_with_a_named_503_and_frees_on_close():
    with PolicyServer(FakePolicy(), max_connections=2).start() as srv:
        a = PolicyClient(port=srv.port, timeout=5, connect_timeout=5).connect()
        b = PolicyClient(port=srv.port, timeout=5, connect_timeout=5).connect()
        with pytest.raises(PolicyServerError) as info:
            PolicyClient(port=srv.port, timeout=5, connect_timeout=60).connect()  # refused at once, no retry loop
        assert info.value.type == "TooManyConnections" and "max_connections=2" in info.value.message
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=5) as resp:
            assert resp.status == 200  # health checks are never capped
        a.close()
        wait_for(lambda: len(srv._connections) == 1)  # noqa: SLF001 - the handler has ended
        with PolicyClient(port=srv.port, timeout=5, connect_timeout=5) as c:
            check_reply(c.infer(make_obs(1, 1)), 1, 1)
        check_reply(b.infer(make_obs(2, 2)), 2, 2)
        b.close()
        assert srv.num_refused_connections == 1


def test_auth_scheme_is_case_insensitive():
    with PolicyServer(FakePolicy(), token="s3cret").start() as srv:
        for header in ("bearer s3cret", "BEARER s3cret", "api-key s3cret", "API-KEY s3cret", "Bearer   s3cret "):
            with connect(
                f"ws://127.0.0.1:{srv.port}", proxy=None, open_timeout=5, additional_headers={"Authorization": header}
            ) as ws:
                assert protocol.unpackb(ws.recv(timeout=5))["name"] == "fake", header


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_tokens_are_rate_limited_per_peer_with_bounded_memory():
    from sensorvla.serving.server import AuthLimiter

    clock = FakeClock()
    limiter = AuthLimiter(max_failures=3, lockout_s=30.0, clock=clock)
    with PolicyServer(FakePolicy(), token="s3cret", auth_limiter=limiter).start() as srv:
        for _ in range(3):
            with pytest.raises(PolicyServerError, match="Unauthorized"):
                PolicyClient(port=srv.port, token="guess", connect_timeout=5).connect()
        with pytest.raises(PolicyServerError) as info:  # locked out: even the right token waits
            PolicyClient(port=srv.port, token="s3cret", connect_timeout=60).connect()
        assert info.value.type == "RateLimited" and "retry in 30 s" in info.value.message
        clock.now += 31.0
        with PolicyClient(port=srv.port, token="s3cret", timeout=5, connect_timeout=5) as ok:
            check_reply(ok.infer(make_obs(1, 1)), 1, 1)
        assert len(limiter) == 0  # a success forgets the failures
    small = AuthLimiter(max_failures=3, max_peers=4, clock=clock)
    for i in range(100):
        small.failed(f"10.0.0.{i}")
    assert len(small) == 4 and small.retry_after("10.0.0.0") == 0  # bounded: the oldest peers are forgotten


def test_exposure_warning_for_a_network_bind_without_a_token(caplog):
    from sensorvla.serving.server import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None and exposure_warning("0.0.0.0", "t") is None
    assert "--token" in exposure_warning("0.0.0.0", None) and "--token" in exposure_warning("192.168.1.5", None)
    caplog.set_level(logging.WARNING, logger="sensorvla.serving.server")
    with PolicyServer(FakePolicy(), host="0.0.0.0").start():
        pass
    assert any("without a token" in r.getMessage() for r in caplog.records)


def test_errors_reach_an_openpi_style_client_as_errors_and_ours_as_named_errors():
    """openpi's `WebsocketClientPolicy.infer` raises on a str reply: errors are text frames, so an error can never
    be taken for an action chunk (by `infer` or `ActionChunkBroker`); `PolicyClient` still gets type and message."""
    with PolicyServer(FakePolicy()).start() as srv:
        with openpi_style_connect(srv.port, None) as ws:
            protocol.unpackb(ws.recv(timeout=5))
            ws.send(protocol.packb(make_obs(state=np.zeros(3, np.float32))))
            response = ws.recv(timeout=5)
            assert isinstance(response, str)  # what openpi's client raises RuntimeError on
            assert '"ObservationError"' in response and "expected shape (4,)" in response
            ws.send(protocol.packb(make_obs(2, 3)))
            response = ws.recv(timeout=5)
            assert isinstance(response, bytes)
            check_reply(protocol.unpackb(response), 2, 3)
        with PolicyClient(port=srv.port, timeout=5, connect_timeout=5) as client:
            with pytest.raises(PolicyServerError) as info:
                client.infer(make_obs(state=np.zeros(3, np.float32)))
            assert info.value.type == "ObservationError" and info.value.traceback is None


def test_stop_does_not_wait_for_a_running_inference():
    """A handler waiting for the model is cancelled at shutdown: the server stops (connections closed with 1001)
    while the policy is still blocked."""
    policy = FakePolicy()
    srv = PolicyServer(policy).start()
    ws = raw_connect(srv)
    ws.recv(timeout=5)
    ws.send(protocol.packb(make_obs(instruction="block")))
    assert policy.started.wait(timeout=30)
    thread = srv._thread  # noqa: SLF001
    srv.stop(timeout=30)
    try:
        assert not thread.is_alive()  # the server thread has ended...
        assert policy.active == 1  # ...while the inference is still running
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    finally:
        policy.release.set()
        ws.close()
