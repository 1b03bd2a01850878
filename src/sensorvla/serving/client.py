"""Robot-side policy client: synchronous websocket + msgpack-numpy, no torch.

Depends only on numpy, msgpack, websockets and `sensorvla.serving.protocol`, so it installs on a robot
computer with `pip install sensorvla` (no extras). Talks to `PolicyServer` and to openpi servers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from sensorvla.serving import protocol
from sensorvla.serving.protocol import PolicyServerError

__all__ = ["PolicyClient", "PolicyConnectionError", "PolicyServerError"]

logger = logging.getLogger(__name__)


class PolicyConnectionError(ConnectionError):
    """The server could not be reached, or the connection dropped mid-request."""


@dataclass
class _Pending:
    """One stream's samples buffered by `stream_sensor`, not yet sent."""

    shape: tuple[int, ...]
    ts: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    newest: float | None = None


class PolicyClient:
    """Blocking client for a policy server: `metadata` from the handshake, then `infer(obs)` per chunk.

    The constructor does no I/O; the connection opens on `connect()`, on entering the context manager, or
    on the first `metadata`/`infer` access, retrying for up to `connect_timeout` seconds (the server may
    still be loading its checkpoint). After a dropped connection the next call reconnects.

    Args:
        host: server host (IPv6 literals are bracketed for you).
        port: server port (`sensorvla serve` defaults to 8000).
        token: shared secret of a server started with `--token`.
        timeout: seconds to wait for each reply (and for the handshake).
        connect_timeout: total seconds to keep retrying to connect.
        max_message_bytes: largest reply accepted.

    Sensor streaming: `stream_sensor(ts, values)` buffers samples as they arrive; the next `infer` sends
    them (only those) and the server adds them to the connection's sensor history, so a client that
    executes action chunks still gives the policy its full trained window. Each declared stream streams by name,
    `stream_sensor(ts, values, name="tactile")` (sent as `sensor.tactile` + `sensor_timestamps.tactile`); without a
    name it is the dataset's sensor tensor (`sensor`, the legacy layout). `reset()` starts a new episode (server
    session and buffered samples).

    Example:
        >>> with PolicyClient("127.0.0.1", 8000) as client:  # doctest: +SKIP
        ...     client.stream_sensor(ts, values)  # float64 (N,), float32 (N, C_s), as often as they come
        ...     actions = client.infer(obs)["actions"]  # (H, D_a)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 30.0,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.endpoint = protocol.Endpoint(host, port, token, max_message_bytes)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ws: ClientConnection | None = None
        self._metadata: dict[str, Any] | None = None
        self._lock = threading.Lock()  # one request in flight per connection, so replies never mix
        self._streams: dict[str, _Pending] = {}  # stream_sensor samples not yet sent, by observation key

    @property
    def uri(self) -> str:
        """The server's websocket URI."""
        return self.endpoint.uri

    @property
    def metadata(self) -> dict[str, Any]:
        """The server's handshake: the policy metadata plus `"protocol"` (observation spec, size limit)."""
        with self._lock:
            self._ensure_connected()
            assert self._metadata is not None
            return self._metadata

    @property
    def wrench_channels(self) -> int:
        """C_f of the served policy's wrench output: every reply then carries `wrench` float32 (H, C_f), the predicted
        force channels at the chunk's steps in the sensor's units; 0 when the policy has none."""
        return int(self.metadata.get("wrench_channels", 0))

    def get_server_metadata(self) -> dict[str, Any]:
        """openpi-client spelling of `metadata`."""
        return self.metadata

    def connect(self) -> PolicyClient:
        """Open the connection now (retrying up to `connect_timeout`) and read the handshake."""
        with self._lock:
            self._ensure_connected()
        return self

    def stream_sensor(self, ts: Any, values: Any, name: str | None = None) -> None:
        """Buffer samples of one stream (ts float64 (N,) strictly increasing and newer than earlier ones, values
        float32 (N, *shape): (N, C_s) for the dataset's sensor); the next `infer` sends them as `sensor` /
        `sensor_timestamps`, or `sensor.<name>` / `sensor_timestamps.<name>` for the declared stream `name`.

        Raises:
            ValueError: wrong shapes, lengths, non-finite values or timestamps not increasing.
        """
        key = "sensor" if name is None else f"sensor.{name}"
        ts = np.asarray(ts, dtype=np.float64).reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is rejected below
            values = np.asarray(values, dtype=np.float32)
        if values.ndim == 1 and len(ts) == 1:
            values = values[None]
        if values.ndim < 2 or len(values) != len(ts):
            raise ValueError(f"stream_sensor: values must be (N, C_s) with N = len(ts) = {len(ts)}, got {values.shape}")
        p = self._streams.setdefault(key, _Pending(values.shape[1:]))
        if values.shape[1:] != p.shape:
            got, had = (
                (values.shape[1], p.shape[0]) if values.ndim == 2 and len(p.shape) == 1 else (values.shape[1:], p.shape)
            )
            raise ValueError(f"stream_sensor: {got} channels, earlier samples had {had}")
        if not (np.isfinite(ts).all() and np.isfinite(values).all()):
            raise ValueError("stream_sensor: NaN or inf in the timestamps or values (as float32)")
        if len(ts) > 1 and not (np.diff(ts) > 0).all():
            raise ValueError("stream_sensor: timestamps must increase strictly")
        if len(ts) and p.newest is not None and ts[0] <= p.newest:
            raise ValueError(
                f"stream_sensor: t={ts[0]:.6f} is not newer than the last streamed sample t={p.newest:.6f}"
            )
        if len(ts):
            p.ts.append(ts)
            p.values.append(values)
            p.newest = float(ts[-1])

    @property
    def pending_sensor_samples(self) -> int:
        """Samples buffered by `stream_sensor` and not yet sent (every stream)."""
        return sum(len(t) for p in self._streams.values() for t in p.ts)

    def _with_stream(self, obs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
        """obs plus the streamed samples (the newest the server accepts), and how many pending chunks it took of each
        stream."""
        out, taken = dict(obs), {}
        for key, p in self._streams.items():
            ts_key = key.replace("sensor", "sensor_timestamps", 1)
            if not p.ts:
                if obs.get(key) is None and obs.get(ts_key) is None:
                    # streaming, nothing new since the last call: zero rows (the server's history is used)
                    out[key], out[ts_key] = np.zeros((0, *p.shape), np.float32), np.zeros(0, np.float64)
                continue
            if obs.get(key) is not None or obs.get(ts_key) is not None:
                raise ValueError(
                    f"the observation has {key!r} while samples are pending from stream_sensor(); use one or the other"
                )
            ts, values = np.concatenate(p.ts), np.concatenate(p.values)
            limit = ((self._metadata or {}).get("limits") or {}).get("max_sensor_samples")
            if isinstance(limit, int) and len(ts) > limit:
                logger.debug("sending the newest %d of %d streamed samples (server limit)", limit, len(ts))
                ts, values = ts[-limit:], values[-limit:]
            out[key], out[ts_key], taken[key] = values, ts, len(p.ts)
        return out, taken

    def reset(self) -> None:
        """Start a new episode: drop unsent streamed samples and reset the server session (VL features,
        sensor history). The session is fresh on every new connection too."""
        with self._lock:
            self._streams = {}
            if self._ws is None:
                return  # the next connection starts with a fresh session
        reply = self._request(protocol.packb({protocol.CONTROL_KEY: protocol.CONTROL_RESET}))
        if reply.get("ok") is not True:
            raise PolicyServerError(protocol.INVALID_MESSAGE, f"the server did not confirm the reset: {reply}")

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Send one observation, return the server's reply.

        Args:
            obs: e.g. `{"images": uint8 (V, h, w, 3), "state": float32 (D_st,), "sensor": float32 (N, C_s),
                "sensor_timestamps": float64 (N,), "timestamp": float64 (), "instruction": str}`.

        Returns:
            `{"actions": (H, D_a), "timing": {...}, "server_timing": {"infer_ms", "queue_ms", "total_ms"},
            ...}`, and `"wrench": (H, C_f)` (force, the sensor's units) when the policy has the wrench output
            (`wrench_channels` > 0).

        Raises:
            PolicyServerError: the server answered with an error (`.type`, `.message`; the server sends errors
                as text frames of JSON, which openpi's client raises on too), or the request is over the
                server's `max_message_bytes` (`.type == "MessageTooLarge"`, nothing sent), or the server refused
                the connection (`TooManyConnections`, `RateLimited`, `Unauthorized`).
            PolicyConnectionError: no server, or the connection dropped.
            TimeoutError: no reply within `timeout` (the connection is closed so no late reply can be
                mistaken for the next one).

        Samples from `stream_sensor` are sent with it and dropped from the buffer once the server has
        answered (anything but `Busy`); after a Busy reply, a timeout or a dropped connection they are
        sent again with the next call.
        """
        with self._lock:
            self._ensure_connected()
            full, taken = self._with_stream(obs)
        try:
            reply = self._request(protocol.packb(full))
        except PolicyServerError as exc:
            if exc.type != protocol.BUSY:
                self._drop_pending(taken)
            raise
        self._drop_pending(taken)
        return reply

    def _drop_pending(self, taken: dict[str, int]) -> None:
        with self._lock:
            for key, chunks in taken.items():
                if key in self._streams:
                    del self._streams[key].ts[:chunks], self._streams[key].values[:chunks]

    def _request(self, payload: bytes) -> dict[str, Any]:
        """Send one frame, return the decoded reply (raising `PolicyServerError` for an error reply)."""
        with self._lock:
            self._ensure_connected()
            assert self._ws is not None and self._metadata is not None
            limit = (self._metadata.get("protocol") or {}).get("max_message_bytes")
            if isinstance(limit, int) and len(payload) > limit:
                raise PolicyServerError(
                    protocol.MESSAGE_TOO_LARGE,
                    f"the observation is {len(payload)} bytes, over the server's max_message_bytes={limit}; "
                    "send fewer/smaller images or a shorter sensor window, or restart the server with a "
                    "larger max_message_bytes",
                )
            try:
                self._ws.send(payload)
                response = self._ws.recv(timeout=self.timeout)
            except TimeoutError as exc:
                self._drop()
                raise TimeoutError(
                    f"no reply from {self.uri} within {self.timeout}s (PolicyClient(timeout=...))"
                ) from exc
            except ConnectionClosed as exc:
                self._drop()
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code == protocol.CLOSE_MESSAGE_TOO_BIG:
                    raise PolicyServerError(
                        protocol.MESSAGE_TOO_LARGE, f"the server closed the connection: {exc.rcvd}"
                    ) from None
                raise PolicyConnectionError(f"connection to {self.uri} closed during a request: {exc}") from exc
        # errors come as text frames: ours hold JSON (type, message), an openpi server's a traceback
        return protocol.raise_if_error(protocol.decode_reply(response))

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> PolicyClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- internals

    def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:  # already broken; nothing left to release
                logger.debug("error while closing the policy connection", exc_info=True)

    def _ensure_connected(self) -> None:
        if self._ws is not None:
            return
        token = self.endpoint.token
        headers = {"Authorization": f"Bearer {token}"} if token else None
        deadline = time.monotonic() + self.connect_timeout
        delay, attempts = 0.05, 0
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            try:
                ws = connect(
                    self.uri,
                    additional_headers=headers,
                    open_timeout=max(0.1, min(remaining, 10.0)),
                    max_size=self.endpoint.max_message_bytes,
                    compression=None,
                    proxy=None,  # a robot LAN / loopback link; never route through HTTP(S)_PROXY
                    close_timeout=2,
                )
                break
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    raise PolicyServerError(
                        protocol.UNAUTHORIZED,
                        f"{self.uri} rejected the connection (HTTP {status}); pass the token the server was "
                        "started with (`sensorvla serve --token`) as PolicyClient(token=...)",
                    ) from None
                if status in (429, 503):  # failed-token lockout / connection cap: named, not retried
                    body = (exc.response.body or b"").decode("utf-8", "replace").strip()
                    kind = protocol.RATE_LIMITED if status == 429 else protocol.TOO_MANY_CONNECTIONS
                    message = f"{self.uri} refused the connection (HTTP {status}): {body}"
                    raise PolicyServerError(kind, message) from None
                last: Exception = exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                last = exc
            if time.monotonic() + delay >= deadline:
                raise PolicyConnectionError(
                    f"could not connect to the policy server at {self.uri} within {self.connect_timeout}s "
                    f"({attempts} attempts, last error: {last}); start it with "
                    f"`sensorvla serve --checkpoint DIR --port {self.endpoint.port}` or fix host/port"
                ) from last
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
        try:
            hello = ws.recv(timeout=self.timeout)
            metadata = protocol.unpackb(hello) if isinstance(hello, bytes) else None
        except Exception as exc:
            ws.close()
            raise PolicyConnectionError(f"no valid handshake from {self.uri}: {exc}") from exc
        if not isinstance(metadata, dict):
            ws.close()
            raise PolicyConnectionError(
                f"{self.uri} sent a handshake that is not a msgpack map; is it a policy server?"
            )
        self._ws, self._metadata = ws, metadata
        logger.info("connected to policy server %s after %d attempt(s)", self.uri, attempts)
