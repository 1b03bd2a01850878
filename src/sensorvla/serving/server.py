"""Websocket policy server: a thin msgpack-numpy transport around any object with `infer(obs) -> dict`.

It knows nothing about models. One worker thread runs `infer` (one model, one request at a time); frames are
decoded and validated on a small pool of decode threads, within bounds checked before any per-element work
(`protocol.DecodeLimits`), so the asyncio loop only moves bytes and keeps every other client served. Memory is
bounded by a global in-flight byte budget, a connection cap and the websocket message size; a bounded queue
answers `Busy` when full. Per-connection state comes from the policy's optional `new_session()`. Same message
shapes as openpi's server: a metadata handshake on connect, `{"actions", ..., "server_timing"}` replies (whatever
else the policy's `infer` returns, e.g. `wrench`, is passed on), errors
as text frames (openpi's client raises on them), `/healthz` over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import ipaddress
import itertools
import logging
import signal
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from sensorvla.serving import protocol

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = protocol.DEFAULT_MAX_MESSAGE_BYTES
DEFAULT_MAX_QUEUE = 8  # requests waiting or running at once, over all connections
DEFAULT_MAX_CONNECTIONS = 16  # open websocket connections; more get HTTP 503 before the upgrade
DEFAULT_INFLIGHT_MESSAGES = 4  # the default in-flight byte budget, in maximum-size messages
DEFAULT_DECODE_WORKERS = 2  # threads that decode and validate frames (never the event loop)
AUTH_MAX_FAILURES = 5  # failed tokens from one address before it is refused for AUTH_LOCKOUT_S
AUTH_LOCKOUT_S = 30.0
AUTH_TRACKED_PEERS = 4096  # addresses remembered by the failed-token limiter (the oldest are forgotten)
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def exposure_warning(host: str, token: str | None) -> str | None:
    """The warning for a server reachable beyond this machine without a token, else None."""
    if token is not None:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host in LOOPBACK_NAMES
    if loopback:
        return None
    return (
        f"the policy server binds {host!r} without a token: anyone who can reach this port can send observations "
        "and receive actions for the robot. Pass --token SECRET (clients: PolicyClient(token=...) / openpi "
        "api_key=...) or bind 127.0.0.1"
    )


class InflightBudget:
    """Bytes of request frames being decoded, validated or run, over all connections (touched on the event loop
    only). A frame that does not fit is refused at once (`Busy`) and its bytes are released, so the decoded
    copies and model inputs held at any moment stay within about twice the budget."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the in-flight byte budget must be >= 1, got {limit}")
        self.limit = int(limit)
        self.in_use = 0
        self.peak = 0

    def try_acquire(self, n: int) -> bool:
        """Reserve n bytes; False (nothing reserved) when they would exceed the budget."""
        if self.in_use + n > self.limit:
            return False
        self.in_use += n
        self.peak = max(self.peak, self.in_use)
        return True

    def release(self, n: int) -> None:
        """Return n reserved bytes."""
        self.in_use -= n
        if self.in_use < 0:
            raise RuntimeError("InflightBudget released more bytes than were reserved")


class AuthLimiter:
    """Failed tokens per peer address: after `max_failures` within `lockout_s`, the address is refused (HTTP 429)
    until `lockout_s` after its last failure. Remembers at most `max_peers` addresses (least recent forgotten)."""

    def __init__(
        self,
        max_failures: int = AUTH_MAX_FAILURES,
        lockout_s: float = AUTH_LOCKOUT_S,
        max_peers: int = AUTH_TRACKED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_failures < 1 or lockout_s <= 0 or max_peers < 1:
            raise ValueError("AuthLimiter needs max_failures >= 1, lockout_s > 0 and max_peers >= 1")
        self.max_failures, self.lockout_s, self.max_peers, self.clock = max_failures, lockout_s, max_peers, clock
        self._peers: OrderedDict[str, tuple[int, float]] = OrderedDict()  # peer -> (failures, last failure time)

    def __len__(self) -> int:
        return len(self._peers)

    def retry_after(self, peer: str) -> float:
        """Seconds until `peer` may try again (0: it may now)."""
        entry = self._peers.get(peer)
        if entry is None:
            return 0.0
        failures, last = entry
        left = last + self.lockout_s - self.clock()
        if left <= 0:
            del self._peers[peer]  # the lockout or the counting window has passed
            return 0.0
        return left if failures >= self.max_failures else 0.0

    def failed(self, peer: str) -> None:
        """Count one failed token from `peer`."""
        failures, _ = self._peers.pop(peer, (0, 0.0))
        self._peers[peer] = (failures + 1, self.clock())
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)

    def succeeded(self, peer: str) -> None:
        """Forget `peer`'s failures."""
        self._peers.pop(peer, None)


class Policy(Protocol):
    """What the server wraps (the real one is `sensorvla.inference.PolicyRunner`).

    Optional hooks, used when present:
        check_request(obs) -> obs: cheap checks run on a decode thread before queueing (raise an
            `ObservationError`/`LimitExceededError` to reject without touching the model).
        new_session() -> object with `infer(obs)` and optionally `reset()`/`close()`: per-connection
            state (created on connect, reset by the `reset` control message, closed on disconnect).
        reset(): used for the `reset` control message when there is no `new_session`.
    """

    metadata: dict
    observation_spec: dict[str, tuple[tuple[int | None, ...] | None, str]]

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """obs -> {"actions": (H, D_a), "timing": {...}, ...}."""
        ...


class _RequestError(Exception):
    """A request the server answers with an error reply (the connection stays open)."""

    def __init__(self, type: str, message: str, tb: str | None = None):  # noqa: A002
        super().__init__(message)
        self.type, self.message, self.tb = type, message, tb


class PolicyServer:
    """Serve `policy` over a websocket with the openpi message shapes.

    Protocol: on connect the server sends the handshake (the policy's `metadata` plus a `"protocol"` entry with
    the observation spec and the bounds below). Each binary msgpack frame is one observation; the reply is the
    policy's result plus `"server_timing": {"infer_ms", "queue_ms", "total_ms"}` as a binary frame, or an error
    as a text frame holding `{"error": {"type", "message"[, "traceback"]}}` JSON (`protocol.error_text`; openpi's
    client raises on text frames, `PolicyClient` raises `PolicyServerError`), after which the connection keeps
    serving. `{"__control__": "reset"}` resets the connection's session.

    Bounds (each refusal is named; none grows memory without bound):
        - a frame over `max_message_bytes`: websockets closes that connection with 1009 before buffering it;
        - inside a frame, `decode_limits` (keys per map, string and list lengths, items in all): `LimitExceeded`,
          checked by the decoder at each header, on a decode thread, never on the event loop;
        - frames being decoded, validated or run hold at most `max_inflight_bytes`; one more is answered `Busy`;
        - `max_queue` requests waiting or running: one more is answered `Busy`;
        - `max_connections` open connections: one more gets HTTP 503 (`TooManyConnections`) before the upgrade;
        - each connection buffers at most one unread frame (websockets' read queue high-water mark 0).
    Replies never carry NaN/inf: such a result becomes a `NonFiniteOutput` error.

    Args:
        policy: object with `metadata`, `observation_spec` and `infer(obs) -> {"actions": (H, D_a), ...}`.
        host: interface to bind; loopback by default ("0.0.0.0" reaches the robot's network; without a token the
            server logs a warning).
        port: TCP port, 0 = any free port (read `.port` after `start()`).
        token: shared secret; clients must send `Authorization: Bearer <token>`, `Authorization: Api-Key <token>`
            (openpi-client's `api_key=`; the scheme is case-insensitive) or `?token=<token>`, else HTTP 401 and
            no handshake; `AUTH_MAX_FAILURES` failures from one address get HTTP 429 for `AUTH_LOCKOUT_S`.
            `/healthz` never needs it.
        max_message_bytes: largest accepted request frame.
        max_queue: requests waiting or running at once (all connections); more are answered `Busy`.
        max_connections: open connections at once; more get HTTP 503.
        max_inflight_bytes: bytes of frames being decoded or served at once (>= max_message_bytes); None =
            `DEFAULT_INFLIGHT_MESSAGES` x max_message_bytes.
        decode_limits: bounds inside one frame (`protocol.DecodeLimits`).
        decode_workers: threads that decode and validate frames.
        allow_extra_keys: accept observation keys that the spec does not list (passed through).
        send_traceback: include the server traceback in error replies for exceptions raised by the policy (off by
            default: a traceback tells a client about the server's code and paths; `sensorvla serve --debug`).
        log_every: log every n-th request at INFO (the others at DEBUG).
        ping_interval: websocket keepalive interval in seconds (None disables).
        auth_limiter: the failed-token limiter (injectable for tests).
    """

    def __init__(
        self,
        policy: Policy,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_inflight_bytes: int | None = None,
        decode_limits: protocol.DecodeLimits | None = None,
        decode_workers: int = DEFAULT_DECODE_WORKERS,
        allow_extra_keys: bool = False,
        send_traceback: bool = False,
        log_every: int = 1,
        ping_interval: float | None = 20.0,
        auth_limiter: AuthLimiter | None = None,
    ):
        inflight = _checked_bounds(max_message_bytes, token, max_queue, max_connections, max_inflight_bytes)
        if decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {decode_workers}")
        self.policy = policy
        self.max_queue = max_queue
        self.max_connections = max_connections
        self.decode_limits = decode_limits or protocol.DecodeLimits()
        self.decode_workers = decode_workers
        self.endpoint = protocol.Endpoint(host, port, token, max_message_bytes)  # port: the requested one (0: any)
        self.allow_extra_keys = allow_extra_keys
        self.send_traceback = send_traceback
        self.log_every = max(1, log_every)
        self.ping_interval = ping_interval
        self.budget = InflightBudget(inflight)
        self.auth_limiter = AuthLimiter() if auth_limiter is None else auth_limiter
        self._spec = protocol.check_spec(policy.observation_spec)
        self._handshake = self._build_handshake()
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._request_ids = itertools.count(1)
        self._connection_ids = itertools.count(1)
        self.num_requests = 0  # answered requests, errors included
        self.num_errors = 0
        self.num_busy = 0  # requests answered Busy (counted in num_errors too)
        self.num_refused_connections = 0  # HTTP 503 (connection cap) and 429 (failed tokens)
        self._pending = 0  # requests waiting for or running in the worker (touched on the event loop only)
        self._connections: set[ServerConnection] = set()  # admitted by _process_request, until their handler ends
        self._handler_tasks: set[asyncio.Task] = set()
        self._decode_pool: ThreadPoolExecutor | None = None

    def _build_handshake(self) -> bytes:
        """The packed handshake: the policy's metadata plus the `"protocol"` entry (spec and bounds)."""
        handshake = dict(self.policy.metadata)
        if "protocol" in handshake:
            raise ValueError("policy.metadata must not use the key 'protocol' (the server adds it)")
        handshake["protocol"] = {
            "name": protocol.PROTOCOL_NAME,
            "version": protocol.PROTOCOL_VERSION,
            "max_message_bytes": self.endpoint.max_message_bytes,
            "max_queue": self.max_queue,
            "max_connections": self.max_connections,
            "max_inflight_bytes": self.budget.limit,
            "decode_limits": self.decode_limits.to_json(),
            "errors": "text",  # error replies are text frames of JSON (protocol.error_text)
            "observation_spec": protocol.spec_to_json(self._spec),
            "control": list(protocol.CONTROL_COMMANDS),
        }
        try:
            return protocol.packb(handshake)
        except TypeError as exc:
            raise TypeError(f"policy.metadata must be msgpack-serializable (JSON-like): {exc}") from None

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port once listening (the requested one before)."""
        return self._bound_port if self._bound_port is not None else self.endpoint.port

    @property
    def host(self) -> str:
        """The interface the server binds."""
        return self.endpoint.host

    @property
    def url(self) -> str:
        """`ws://host:port` of the listening server."""
        return protocol.ws_uri(self.host, self.port)

    def start(self, timeout: float = 10.0) -> PolicyServer:
        """Serve from a background thread with its own event loop; return once listening."""
        if self._thread is not None:
            raise RuntimeError("PolicyServer.start() was already called; call stop() first")
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._thread_main, name="PolicyServer", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"policy server did not start listening on {self.host}:{self.port} in {timeout}s")
        if self._startup_error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self._startup_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listening socket (also ends `run_forever` from another thread)."""
        thread, loop, event = self._thread, self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already finished
                loop.call_soon_threadsafe(event.set)
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("policy server thread did not stop within %.1fs", timeout)
        self._thread = None

    def run_forever(self) -> None:
        """Serve in the calling thread until Ctrl-C / SIGTERM (or `stop()` from another thread)."""
        self._ready.clear()
        try:
            asyncio.run(self._serve(handle_signals=True))
        except KeyboardInterrupt:
            logger.info("policy server interrupted")

    def __enter__(self) -> PolicyServer:
        # `with PolicyServer(p) as s:` and `with PolicyServer(p).start() as s:` both work.
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve(handle_signals=False))
        except BaseException as exc:  # surfaced by start(); a bind error must not vanish in a thread
            self._startup_error = exc
            self._ready.set()

    async def _serve(self, handle_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    self._loop.add_signal_handler(sig, self._stop_event.set)
        # One worker = one model: requests from all connections are served one at a time, FIFO.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-infer")
        self._decode_pool = ThreadPoolExecutor(max_workers=self.decode_workers, thread_name_prefix="policy-decode")
        try:
            async with serve(
                lambda ws: self._handler(ws, executor),
                self.host,
                self.endpoint.port,
                process_request=self._process_request,
                max_size=self.endpoint.max_message_bytes,
                compression=None,  # arrays barely compress; deflate only costs latency
                max_queue=0,  # backpressure: stop reading a connection once one unread frame is buffered
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_interval,
                close_timeout=1,
            ) as server:
                self._bound_port = server.sockets[0].getsockname()[1]
                logger.info(
                    "policy server listening on ws://%s:%d (token %s, max message %d bytes, in-flight budget %d "
                    "bytes, max %d connections)",
                    self.host,
                    self._bound_port,
                    "required" if self.endpoint.token else "off",
                    self.endpoint.max_message_bytes,
                    self.budget.limit,
                    self.max_connections,
                )
                warning = exposure_warning(self.host, self.endpoint.token)
                if warning:
                    logger.warning(warning)
                self._ready.set()
                await self._stop_event.wait()
                logger.info("policy server stopping: closing %d connection(s)", len(self._handler_tasks))
                # Close every connection with 1001 "going away" (each waits at most close_timeout for its peer),
                # then cancel the handlers: one waiting for an inference would otherwise hold the shutdown until
                # the model returns.
                server.close(close_connections=False)
                await asyncio.gather(
                    *(c.close(1001, "server shutting down") for c in list(self._connections)), return_exceptions=True
                )
                for task in list(self._handler_tasks):
                    task.cancel()
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self._loop = None
            self._stop_event = None

    # ------------------------------------------------------------------------------------- requests

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """HTTP hook before the websocket upgrade: `/healthz`, the failed-token limit, the token, the connection cap."""
        url = urlsplit(request.path)
        if url.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok")
        peer = str(connection.remote_address[0]) if connection.remote_address else "?"
        token = self.endpoint.token
        if token is not None:
            wait_s = self.auth_limiter.retry_after(peer)
            if wait_s > 0:
                self.num_refused_connections += 1
                response = connection.respond(
                    http.HTTPStatus.TOO_MANY_REQUESTS,
                    f"{protocol.RATE_LIMITED}: too many failed tokens from {peer}; retry in {wait_s:.0f} s with the "
                    "right token\n",
                )
                response.headers["Retry-After"] = str(max(1, round(wait_s)))
                return response
            supplied = _supplied_token(request.headers.get("Authorization", ""), url.query)
            if supplied is None or not hmac.compare_digest(supplied.encode(), token.encode()):
                self.auth_limiter.failed(peer)
                logger.warning("rejected connection from %s: missing or wrong token", connection.remote_address)
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED,
                    "missing or wrong token: send 'Authorization: Bearer <token>' (PolicyClient(token=...)) or "
                    "'Authorization: Api-Key <token>' (openpi_client api_key=...)\n",
                )
            self.auth_limiter.succeeded(peer)
        self._connections = {c for c in self._connections if c.state is not State.CLOSED}  # failed handshakes
        if len(self._connections) >= self.max_connections:
            self.num_refused_connections += 1
            logger.warning("refused connection from %s: max_connections=%d reached", peer, self.max_connections)
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"{protocol.TOO_MANY_CONNECTIONS}: the server has {len(self._connections)} open connections "
                f"(max_connections={self.max_connections}); close one, or start the server with a larger "
                "--max-connections\n",
            )
        self._connections.add(connection)
        return None

    async def _handler(self, ws: ServerConnection, executor: ThreadPoolExecutor) -> None:
        conn = next(self._connection_ids)
        logger.info("connection %d from %s opened", conn, ws.remote_address)
        task = asyncio.current_task()
        if task is not None:
            self._handler_tasks.add(task)
        n = 0
        new_session = getattr(self.policy, "new_session", None)
        session = new_session() if callable(new_session) else self.policy
        try:
            await ws.send(self._handshake)
            while True:
                message: bytes | str | None = await ws.recv()
                t0 = time.perf_counter()
                n += 1
                reply = await self._answer(message, executor, session, conn, n, t0)
                message = None  # the frame's bytes are released (the budget no longer counts them)
                await ws.send(reply)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else (exc.sent.code if exc.sent is not None else None)
            if code == protocol.CLOSE_MESSAGE_TOO_BIG:
                logger.warning(
                    "connection %d closed: a frame exceeded max_message_bytes=%d (code 1009)",
                    conn,
                    self.endpoint.max_message_bytes,
                )
            else:
                logger.info("connection %d closed after %d request(s) (code %s)", conn, n, code)
        except asyncio.CancelledError:
            logger.info("connection %d closed by the server's shutdown after %d request(s)", conn, n)
        finally:
            self._connections.discard(ws)
            if task is not None:
                self._handler_tasks.discard(task)
            close = getattr(session, "close", None) if session is not self.policy else None
            if callable(close):
                if self._stop_event is not None and self._stop_event.is_set():
                    threading.Thread(target=close, name="session-close", daemon=True).start()  # never wait at exit
                else:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(close)

    async def _answer(
        self, message: str | bytes, executor: ThreadPoolExecutor, session: Any, conn: int, n: int, t0: float
    ) -> bytes | str:
        """One request -> the reply frame (bytes, or an error as text). Never raises for a bad request or a failing
        policy."""
        rid = next(self._request_ids)
        self.num_requests += 1
        size = len(message)
        admitted = False
        try:
            if not self.budget.try_acquire(size):
                self.num_busy += 1
                raise _RequestError(
                    protocol.BUSY,
                    f"the server is decoding or serving {self.budget.in_use} bytes of requests; this {size}-byte "
                    f"frame would exceed max_inflight_bytes={self.budget.limit}; retry shortly, or start the server "
                    "with a larger --max-inflight-mb",
                )
            admitted = True
            loop = asyncio.get_running_loop()
            command, obs = await loop.run_in_executor(self._decode_pool, self._decode_and_check, message)
            if command is not None:
                return await self._control(command, session, conn)
            if self._pending >= self.max_queue:
                self.num_busy += 1
                raise _RequestError(
                    protocol.BUSY,
                    f"the server is busy: {self._pending} request(s) queued or running (max_queue="
                    f"{self.max_queue}); retry shortly, or start the server with a larger --max-queue",
                )
            t_submit = time.perf_counter()
            self._pending += 1
            try:
                result, queue_ms, infer_ms = await loop.run_in_executor(executor, self._infer, session, obs, t_submit)
            finally:
                self._pending -= 1
            reply = self._check_result(result)
            reply["server_timing"] = {
                "infer_ms": infer_ms,
                "queue_ms": queue_ms,
                "total_ms": (time.perf_counter() - t0) * 1e3,
            }
            try:
                packed = protocol.packb(reply)
            except (TypeError, ValueError, OverflowError) as exc:
                raise _RequestError(
                    protocol.INVALID_POLICY_OUTPUT, f"the policy's reply cannot be sent: {exc}"
                ) from None
        except _RequestError as err:
            self.num_errors += 1
            total_ms = (time.perf_counter() - t0) * 1e3
            logger.warning(
                "request %d (conn %d #%d) -> %s: %.300s [%.1f ms]", rid, conn, n, err.type, err.message, total_ms
            )
            return protocol.error_text(err.type, err.message, err.tb if self.send_traceback else None)
        except Exception as exc:  # a server bug must cost one request, not the connection
            self.num_errors += 1
            logger.exception("request %d (conn %d #%d): internal server error", rid, conn, n)
            tb = traceback.format_exc() if self.send_traceback else None
            return protocol.error_text(protocol.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", tb)
        finally:
            if admitted:
                self.budget.release(size)
        timing = reply["server_timing"]
        logger.log(
            logging.INFO if rid % self.log_every == 0 else logging.DEBUG,
            "request %d (conn %d #%d): infer %.1f ms, queue %.1f ms, total %.1f ms",
            rid,
            conn,
            n,
            timing["infer_ms"],
            timing["queue_ms"],
            timing["total_ms"],
        )
        return packed

    async def _control(self, command: str, session: Any, conn: int) -> bytes:
        """Answer a control message (`reset`)."""
        if command != protocol.CONTROL_RESET:
            raise _RequestError(
                protocol.INVALID_MESSAGE,
                f"unknown control command {command[:64]!r}; the server knows {list(protocol.CONTROL_COMMANDS)}",
            )
        reset = getattr(session, "reset", None)
        if callable(reset):
            try:
                # not on the model queue: this connection has no request in flight, so its state is idle
                await asyncio.to_thread(reset)
            except Exception as exc:
                raise _RequestError(type(exc).__name__, str(exc) or repr(exc), traceback.format_exc()) from None
        logger.info("connection %d: session reset", conn)
        return protocol.packb({"control": command, "ok": True})

    def _decode_and_check(self, message: str | bytes) -> tuple[str | None, dict[str, Any] | None]:
        """On a decode thread: frame -> (control command, None) or (None, validated observation)."""
        obs = self._decode_message(message)
        command = protocol.control_command(obs)
        if command is not None:
            return command, None
        return None, self._validate(obs)

    def _decode_message(self, message: str | bytes) -> Any:
        if isinstance(message, str):
            raise _RequestError(
                protocol.INVALID_MESSAGE,
                "got a text frame; send the observation as a binary frame of protocol.packb(obs)",
            )
        try:
            obs = protocol.unpackb(message, self.decode_limits)
        except protocol.LimitExceededError as exc:
            raise _RequestError(exc.error_type, str(exc)) from None
        except Exception as exc:  # msgpack raises several unrelated types on garbage input
            raise _RequestError(
                protocol.INVALID_MESSAGE,
                f"could not decode the {len(message)}-byte frame as msgpack-numpy "
                f"({type(exc).__name__}: {exc}); send protocol.packb(obs)",
            ) from None
        return obs

    def _validate(self, obs: Any) -> dict[str, Any]:
        """Spec check, then the policy's own `check_request` (bounds, dtypes, finiteness), on a decode thread."""
        try:
            obs = protocol.validate_observation(obs, self._spec, allow_extra_keys=self.allow_extra_keys)
            check = getattr(self.policy, "check_request", None)
            if callable(check):
                check(obs)
        except protocol.ObservationError as exc:
            raise _RequestError(exc.error_type, str(exc)) from None
        return obs

    @staticmethod
    def _infer(session: Any, obs: dict[str, Any], t_submit: float) -> tuple[Any, float, float]:
        """Runs in the single inference thread; returns (result, queue_ms, infer_ms)."""
        t_start = time.perf_counter()
        try:
            result = session.infer(obs)
        except (protocol.ObservationError, protocol.NonFiniteOutputError) as exc:  # the request's fault
            raise _RequestError(exc.error_type, str(exc)) from None
        except Exception as exc:
            raise _RequestError(type(exc).__name__, str(exc) or repr(exc), traceback.format_exc()) from None
        t_end = time.perf_counter()
        return result, (t_start - t_submit) * 1e3, (t_end - t_start) * 1e3

    @staticmethod
    def _check_result(result: Any) -> dict[str, Any]:
        if not isinstance(result, dict) or "actions" not in result:
            got = f"a dict with keys {sorted(result)}" if isinstance(result, dict) else type(result).__name__
            raise _RequestError(
                protocol.INVALID_POLICY_OUTPUT, f"policy.infer must return a dict with 'actions'; got {got}"
            )
        actions = result["actions"]
        if not isinstance(actions, np.ndarray):
            raise _RequestError(
                protocol.INVALID_POLICY_OUTPUT,
                f"policy.infer returned actions of type {type(actions).__name__}; return a numpy array (H, D_a)",
            )
        if actions.dtype.kind not in "biuf":
            raise _RequestError(
                protocol.INVALID_POLICY_OUTPUT, f"policy.infer returned actions of dtype {actions.dtype}; return floats"
            )
        bad = protocol.first_non_finite(result)
        if bad is not None:
            raise _RequestError(
                protocol.NON_FINITE_OUTPUT,
                f"the policy's result has NaN/inf at {bad}; no actions are sent (check the inputs' magnitudes)",
            )
        return dict(result)


def _checked_bounds(
    max_message_bytes: int, token: str | None, max_queue: int, max_connections: int, max_inflight_bytes: int | None
) -> int:
    """Validate the server's bounds; return the in-flight byte budget (its default filled in)."""
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
    if token is not None and not token:
        raise ValueError("token must be a non-empty string or None (no authentication)")
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    inflight = DEFAULT_INFLIGHT_MESSAGES * max_message_bytes if max_inflight_bytes is None else max_inflight_bytes
    if inflight < max_message_bytes:
        raise ValueError(
            f"max_inflight_bytes={inflight} must be >= max_message_bytes={max_message_bytes} (else a maximum-size "
            "frame could never be served)"
        )
    return inflight


def _supplied_token(auth: str, query: str) -> str | None:
    """The token a client sent: `Authorization: Bearer|Api-Key <token>` (scheme case-insensitive, RFC 7235) or
    `?token=`; None when neither."""
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() in ("bearer", "api-key") and value.strip():  # Api-Key: openpi_client(api_key=...)
        return value.strip()
    return (parse_qs(query).get("token") or [None])[0]


def serve_forever(
    policy: Policy,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    **kwargs: Any,
) -> None:
    """Build a `PolicyServer` and serve in the calling thread until Ctrl-C (what `sensorvla serve` calls)."""
    PolicyServer(policy, host=host, port=port, token=token, max_message_bytes=max_message_bytes, **kwargs).run_forever()
