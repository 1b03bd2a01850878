"""Robot-side policy client: synchronous websocket + msgpack-numpy, no torch.

Depends only on numpy, msgpack, websockets and `sensorvla.serving.protocol`, so it installs on a robot
computer with `pip install sensorvla` (no extras). Talks to `PolicyServer` and to openpi servers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from sensorvla.serving import protocol
from sensorvla.serving.protocol import PolicyServerError

__all__ = ["PolicyClient", "PolicyConnectionError", "PolicyServerError"]

logger = logging.getLogger(__name__)


class PolicyConnectionError(ConnectionError):
    """The server could not be reached, or the connection dropped mid-request."""


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

    Example:
        >>> with PolicyClient("127.0.0.1", 8000) as client:  # doctest: +SKIP
        ...     actions = client.infer(obs)["actions"]  # (H, D_a)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 30.0,
        max_message_bytes: int = 64 * 2**20,
    ):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self._token = token
        self._ws: ClientConnection | None = None
        self._metadata: dict[str, Any] | None = None
        self._lock = threading.Lock()  # one request in flight per connection, so replies never mix

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"ws://{host}:{self.port}"

    @property
    def metadata(self) -> dict[str, Any]:
        """The server's handshake: the policy metadata plus `"protocol"` (observation spec, size limit)."""
        with self._lock:
            self._ensure_connected()
            assert self._metadata is not None
            return self._metadata

    def get_server_metadata(self) -> dict[str, Any]:
        """openpi-client spelling of `metadata`."""
        return self.metadata

    def connect(self) -> PolicyClient:
        """Open the connection now (retrying up to `connect_timeout`) and read the handshake."""
        with self._lock:
            self._ensure_connected()
        return self

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Send one observation, return the server's reply.

        Args:
            obs: e.g. `{"images": uint8 (V, h, w, 3), "state": float32 (D_st,), "sensor": float32 (N, C_s),
                "sensor_timestamps": float64 (N,), "timestamp": float64 (), "instruction": str}`.

        Returns:
            `{"actions": (H, D_a), "timing": {...}, "server_timing": {"infer_ms", "queue_ms", "total_ms"},
            ...}`.

        Raises:
            PolicyServerError: the server answered with an error (`.type`, `.message`), or the request
                is over the server's `max_message_bytes` (`.type == "MessageTooLarge"`, nothing sent).
            PolicyConnectionError: no server, or the connection dropped.
            TimeoutError: no reply within `timeout` (the connection is closed so no late reply can be
                mistaken for the next one).
        """
        payload = protocol.packb(obs)
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
        if isinstance(response, str):  # openpi servers send a traceback as a text frame on failure
            raise PolicyServerError(protocol.INTERNAL_ERROR, response)
        return protocol.raise_if_error(protocol.unpackb(response))

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
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
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
                    max_size=self.max_message_bytes,
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
                last: Exception = exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                last = exc
            if time.monotonic() + delay >= deadline:
                raise PolicyConnectionError(
                    f"could not connect to the policy server at {self.uri} within {self.connect_timeout}s "
                    f"({attempts} attempts, last error: {last}); start it with "
                    f"`sensorvla serve --checkpoint DIR --port {self.port}` or fix host/port"
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
