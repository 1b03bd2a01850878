"""Wire protocol of the policy server: msgpack-numpy packing, message shapes and observation validation.

Byte-compatible with openpi's `msgpack_numpy` (arrays are `{b"__ndarray__": True, b"data", b"dtype",
b"shape"}` maps with bytes keys), so existing openpi robot clients can talk to a sensorvla server.
Imports only numpy and msgpack: the robot-side client depends on this module.

Messages (docs/serving.md): on connect the server sends the handshake (the policy's metadata + a `protocol` entry);
a request is an observation map; a reply is `{"actions": (H, D_a), "timing", "vl_age_s", "vl_fresh",
"sensor_history", "warnings", "server_timing"}`, plus `"wrench": (H, C_f)` (the predicted force channels at the
chunk's steps, the sensor's units) when the handshake has `wrench_channels`; an error is a text frame of JSON
(`error_text`); `{CONTROL_KEY: "reset"}` is a control message.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

PROTOCOL_NAME = "sensorvla-msgpack-numpy"
PROTOCOL_VERSION = 1

# Error types carried in `{"error": {"type": ..., "message": ...}}` replies. A failing `policy.infer`
# reports its own exception class name (e.g. "RuntimeError") instead.
INVALID_MESSAGE = "InvalidMessage"  # not msgpack, truncated, a text frame, or not a map
OBSERVATION_ERROR = "ObservationError"  # missing/unknown key, wrong shape/dtype, NaN/inf
MESSAGE_TOO_LARGE = "MessageTooLarge"  # raised client-side before sending; the server closes with 1009
INVALID_POLICY_OUTPUT = "InvalidPolicyOutput"  # the policy returned something that is not a reply
INTERNAL_ERROR = "InternalError"
UNAUTHORIZED = "Unauthorized"
LIMIT_EXCEEDED = "LimitExceeded"  # a request over a work bound (instruction tokens, pixels, sensor samples)
BUSY = "Busy"  # the server's request queue is full; answered at once, retry later
NON_FINITE_OUTPUT = "NonFiniteOutput"  # the model produced NaN/inf actions; none are sent
TOO_MANY_CONNECTIONS = "TooManyConnections"  # HTTP 503 before the upgrade: the server is at --max-connections
RATE_LIMITED = "RateLimited"  # HTTP 429: too many failed tokens from this address; wait and retry

# Control messages: a request map whose only key is CONTROL_KEY. `{"__control__": "reset"}` clears the
# connection's episode state (VL features, sensor history) and is answered `{"control": "reset", "ok": True}`.
CONTROL_KEY = "__control__"
CONTROL_RESET = "reset"
CONTROL_COMMANDS = (CONTROL_RESET,)

# Websocket close code the server uses when a frame exceeds max_message_bytes (RFC 6455 "message too big").
CLOSE_MESSAGE_TOO_BIG = 1009
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20  # a 650 x 1026 float32 sensor window is 2.7 MB; 3 raw VGA views 2.8 MB

# Keys of openpi's array encoding. Bytes keys on the wire (what openpi writes); both spellings decode.
_ND = (b"__ndarray__", "__ndarray__")
_NG = (b"__npgeneric__", "__npgeneric__")
_DECODABLE_KINDS = frozenset("biufcUS")  # never "O" (objects) or "V" (raw/structured)

# key -> (shape with None wildcards, or None for any shape; dtype kind "f"/"u"/... or an exact dtype name), plus
# a third element True for a key the client may leave out (e.g. `timestamp`, or `sensor` for a client without one)
ObservationSpec = dict[str, tuple[Any, ...]]

# Error replies travel as text frames holding this JSON: openpi's `WebsocketClientPolicy.infer` raises on a str
# reply (its own server sends a traceback as text), so an error can never be taken for an action chunk; our
# `PolicyClient` parses the JSON back into a `PolicyServerError`. Binary frames carry only real replies.
ERROR_TEXT_MAX_CHARS = 16_384  # an error message is cut to this many characters (a hostile key cannot bloat it)
_HINT_KEYS = 8  # unknown keys named (with a "did you mean" hint) in an error; the rest are counted
_HINT_KEY_CHARS = 64  # longer unknown keys are shortened in the message and get no hint


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what one request frame may hold, checked by the msgpack decoder as it reads each header, before
    any element is built (a 1,000,000-key map or a 30 M-character key is refused in microseconds).

    Args:
        max_map_len: keys in any one map (an observation, or an encoded array's 4 fields).
        max_str_len: bytes in any one string (keys and the instruction).
        max_array_len: elements of any one list.
        max_items: list elements plus map entries in the whole frame (bounds the decoded size of nested lists,
            whose Python objects are ~30x the bytes on the wire); numpy arrays count as one item.
        max_bin_len: bytes of any one binary field (array data); None = no bound beyond the frame size.
    """

    max_map_len: int = 64
    max_str_len: int = 256 * 1024
    max_array_len: int = 1 << 14
    max_items: int = 1 << 14
    max_bin_len: int | None = None

    def __post_init__(self):
        for name in ("max_map_len", "max_str_len", "max_array_len", "max_items"):
            if int(getattr(self, name)) < 4:  # an encoded array is a map of 4 fields
                raise ValueError(f"DecodeLimits.{name} must be >= 4, got {getattr(self, name)}")

    def to_json(self) -> dict[str, int | None]:
        """The bounds as a plain dict (sent in the server handshake)."""
        return {
            "max_map_len": self.max_map_len,
            "max_str_len": self.max_str_len,
            "max_array_len": self.max_array_len,
            "max_items": self.max_items,
            "max_bin_len": self.max_bin_len,
        }


@dataclass(frozen=True)
class Endpoint:
    """What both ends of a connection agree on: the server's host and port, the shared token (None: no
    authentication) and the largest websocket message in bytes."""

    host: str
    port: int
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def uri(self) -> str:
        """`ws://host:port` (an IPv6 literal bracketed)."""
        return ws_uri(self.host, self.port)


def ws_uri(host: str, port: int) -> str:
    """`ws://host:port` of a server, an IPv6 literal bracketed."""
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"ws://{host}:{port}"


class ObservationError(ValueError):
    """An observation does not match the policy's observation spec (key, shape, dtype or value)."""

    error_type = OBSERVATION_ERROR


class LimitExceededError(ObservationError):
    """A request exceeds a work bound (instruction length, image pixels, sensor samples); it never runs."""

    error_type = LIMIT_EXCEEDED


class NonFiniteOutputError(RuntimeError):
    """The policy produced non-finite actions; an error is returned instead of them."""

    error_type = NON_FINITE_OUTPUT


class PolicyServerError(RuntimeError):
    """The server answered a request with an error reply.

    Attributes:
        type: the error type (`ObservationError`, `InvalidMessage`, or the policy's exception class name).
        message: the server's message.
        traceback: the server-side traceback for exceptions raised by the policy, else None.
    """

    def __init__(self, type: str, message: str, traceback: str | None = None):  # noqa: A002
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback


# --------------------------------------------------------------------------------------------- packing


def _default(obj: Any) -> Any:
    """msgpack `default` hook: numpy arrays/scalars -> openpi maps; tuples and mapping subclasses too."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "VO":
            raise TypeError(f"cannot send a numpy array of dtype {obj.dtype} (object/void); convert it first")
        # tobytes() writes C order, so non-contiguous views are handled.
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        if obj.dtype.kind in "VO":
            raise TypeError(f"cannot send a numpy scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    # strict_types routes these here (exact types only go through msgpack's fast path).
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, bool | int | float | str | bytes | list):  # subclasses, e.g. IntEnum, str enums
        for base in (bool, int, float, str, bytes, list):
            if isinstance(obj, base):
                return base(obj)
    raise TypeError(
        f"cannot serialize a {type(obj).__module__}.{type(obj).__qualname__} for the policy protocol; "
        "send numpy arrays, python scalars, str, bytes, lists or dicts (convert torch tensors with .numpy())"
    )


def packb(obj: Any) -> bytes:
    """Serialize `obj` (nested dicts/lists of numpy arrays, numpy scalars, str, numbers) to msgpack bytes.

    numpy scalars keep their dtype (strict types: `np.float64(1.0)` is not flattened to a python float).

    Raises:
        TypeError: for values the protocol cannot carry (torch tensors, object arrays, ...).
    """
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=True)


def _get(obj: dict, keys: tuple[bytes, str]) -> Any:
    return obj[keys[0]] if keys[0] in obj else obj[keys[1]]


def _field(obj: dict, name: str) -> Any:
    try:
        return _get(obj, (name.encode(), name))
    except KeyError:
        raise ValueError(f"encoded numpy value lacks the {name!r} field") from None


def _checked_dtype(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii")
    if not isinstance(raw, str) or len(raw) > 16:
        raise ValueError(f"bad encoded dtype {raw!r}")
    dtype = np.dtype(raw)
    if dtype.kind not in _DECODABLE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"refusing to decode a numpy value of dtype {dtype} (only bool/int/float/complex/str)")
    return dtype


def _object_hook(obj: dict) -> Any:
    """msgpack `object_hook`: openpi array/scalar maps -> numpy; every other map unchanged."""
    if _ND[0] in obj or _ND[1] in obj:
        dtype = _checked_dtype(_field(obj, "dtype"))
        shape = _field(obj, "shape")
        data = _field(obj, "data")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"bad encoded array shape {shape!r}")
        if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
            raise ValueError(
                f"encoded array of shape {tuple(shape)} and dtype {dtype} needs "
                f"{math.prod(shape) * dtype.itemsize} bytes, got "
                f"{len(data) if isinstance(data, bytes) else type(data).__name__}"
            )
        # Copy so that receivers get a writable array (torch.from_numpy warns on read-only buffers).
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if _NG[0] in obj or _NG[1] in obj:
        return _checked_dtype(_field(obj, "dtype")).type(_field(obj, "data"))
    return obj


_MSGPACK_LIMIT = re.compile(r"^(\d+) exceeds max_(str|bin|array|map)_len\((\d+)\)$")
_LIMIT_WHAT = {"str": "a string of {n} bytes", "bin": "a binary field of {n} bytes", "array": "a list of {n} elements",
               "map": "a map of {n} keys"}  # fmt: skip


def unpackb(data: bytes, limits: DecodeLimits | None = None) -> Any:
    """Inverse of `packb`; also decodes openpi messages. Arrays come back writable, C-contiguous.

    Args:
        limits: bounds checked while decoding (the server passes its `DecodeLimits`); None = only the size of
            `data` bounds what it may hold (replies from a server the client chose to trust).

    Raises:
        LimitExceededError: the frame holds more than `limits` allow (nothing past the offending header is built).
        ValueError: (or a msgpack exception) on a payload that is not valid msgpack-numpy.
    """
    if limits is None:
        return msgpack.unpackb(data, object_hook=_object_hook, raw=False, strict_map_key=True)
    items = 0

    def count(n: int) -> None:
        nonlocal items
        items += n
        if items > limits.max_items:
            raise LimitExceededError(
                f"the frame holds more than max_items={limits.max_items} list elements and map entries; send "
                "numbers as numpy arrays (one item each), not as Python lists"
            )

    def object_hook(obj: dict) -> Any:
        count(len(obj))
        return _object_hook(obj)

    def list_hook(obj: list) -> list:
        count(len(obj))
        return obj

    try:
        return msgpack.unpackb(
            data,
            object_hook=object_hook,
            list_hook=list_hook,
            raw=False,
            strict_map_key=True,
            max_map_len=limits.max_map_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_bin_len=len(data) if limits.max_bin_len is None else limits.max_bin_len,
            max_ext_len=0,
        )
    except ValueError as exc:
        match = _MSGPACK_LIMIT.match(str(exc))
        if match is None:
            raise
        n, kind, bound = match.groups()
        raise LimitExceededError(
            f"the frame holds {_LIMIT_WHAT[kind].format(n=n)}, over the server's decode bound max_{kind}_len={bound} "
            "(refused before decoding it); an observation is a small map of arrays, a str instruction and numbers"
        ) from None


# ------------------------------------------------------------------------------------------ messages


def make_error(type: str, message: str, traceback: str | None = None) -> dict[str, Any]:  # noqa: A002
    """The error reply `{"error": {"type", "message"[, "traceback"]}}`."""
    err: dict[str, Any] = {"type": type, "message": message}
    if traceback:
        err["traceback"] = traceback
    return {"error": err}


def error_text(type: str, message: str, traceback: str | None = None) -> str:  # noqa: A002
    """An error reply as the text frame the server sends: the JSON of `make_error` (message cut to
    `ERROR_TEXT_MAX_CHARS`). openpi's client raises `RuntimeError` on any text frame; `decode_reply` parses it."""
    if len(message) > ERROR_TEXT_MAX_CHARS:
        message = message[:ERROR_TEXT_MAX_CHARS] + f"... [{len(message) - ERROR_TEXT_MAX_CHARS} more characters]"
    return json.dumps(make_error(type, message, traceback), ensure_ascii=False)


def decode_reply(frame: bytes | str) -> Any:
    """A server frame -> the reply map: binary frames are msgpack-numpy, text frames are errors (ours, JSON from
    `error_text`, come back as `{"error": {...}}`; anything else, e.g. an openpi server's traceback, as an
    `InternalError` holding the text)."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return unpackb(bytes(frame))
    try:
        reply = json.loads(frame)
    except ValueError:
        reply = None
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        return reply
    return make_error(INTERNAL_ERROR, frame)


def control_command(msg: Any) -> str | None:
    """The command of a control message (`{"__control__": "reset"}`), else None (an observation)."""
    if isinstance(msg, dict) and CONTROL_KEY in msg and len(msg) == 1:
        return msg[CONTROL_KEY] if isinstance(msg[CONTROL_KEY], str) else ""
    return None


def first_non_finite(obj: Any, path: str = "reply") -> str | None:
    """Path of the first NaN/inf float inside a nested reply (dicts, lists, arrays, scalars), else None."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = first_non_finite(v, f"{path}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            bad = first_non_finite(v, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(obj, float | np.floating | np.complexfloating | complex | np.ndarray):
        arr = np.asarray(obj)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            return path
    return None


def raise_if_error(reply: Any) -> dict[str, Any]:
    """Return `reply` if it is a normal reply; raise `PolicyServerError` if it is an error reply."""
    if not isinstance(reply, dict):
        raise PolicyServerError(INVALID_MESSAGE, f"expected a map from the server, got {type(reply).__name__}")
    err = reply.get("error")
    if isinstance(err, dict) and "actions" not in reply:
        raise PolicyServerError(str(err.get("type", INTERNAL_ERROR)), str(err.get("message", "")), err.get("traceback"))
    return reply


def spec_to_json(spec: ObservationSpec) -> dict[str, dict[str, Any]]:
    """Observation spec -> `{key: {"shape": [..., None], "dtype": kind[, "optional": True]}}` for the handshake."""
    out: dict[str, dict[str, Any]] = {}
    for key, (shape, dtype, *optional) in spec.items():
        out[key] = {"shape": None if shape is None else list(shape), "dtype": dtype}
        if optional and optional[0]:
            out[key]["optional"] = True
    return out


def spec_from_json(data: Mapping[str, Mapping[str, Any]]) -> ObservationSpec:
    """Inverse of `spec_to_json`."""
    out: ObservationSpec = {}
    for key, v in data.items():
        shape = None if v["shape"] is None else tuple(v["shape"])
        out[key] = (shape, str(v["dtype"]), True) if v.get("optional") else (shape, str(v["dtype"]))
    return out


def is_optional(entry: tuple[Any, ...]) -> bool:
    """Whether a spec entry `(shape, dtype[, optional])` may be left out of an observation."""
    return len(entry) > 2 and bool(entry[2])


# ---------------------------------------------------------------------------------------- validation


def check_spec(spec: Mapping[str, Any]) -> ObservationSpec:
    """Validate an observation spec's form (fail fast at server construction, not on the first request).

    Raises:
        ValueError: naming the bad entry.
    """
    out: ObservationSpec = {}
    for key, entry in spec.items():
        try:
            shape, dtype, *rest = entry
        except (TypeError, ValueError):
            raise ValueError(f"observation_spec[{key!r}] must be (shape, dtype[, optional]), got {entry!r}") from None
        if len(rest) > 1 or (rest and not isinstance(rest[0], bool)):
            raise ValueError(f"observation_spec[{key!r}]: the third element must be a bool (optional), got {rest}")
        if shape is not None and (
            not isinstance(shape, tuple | list) or not all(s is None or (isinstance(s, int) and s >= 0) for s in shape)
        ):
            raise ValueError(f"observation_spec[{key!r}]: shape must be a tuple of ints/None or None, got {shape!r}")
        if not isinstance(dtype, str) or not dtype:
            raise ValueError(f"observation_spec[{key!r}]: dtype must be a kind ('f') or a dtype name ('float32')")
        if len(dtype) == 1:
            if dtype not in _DECODABLE_KINDS:
                raise ValueError(f"observation_spec[{key!r}]: unknown dtype kind {dtype!r}; use one of 'biufcUS'")
        else:
            try:
                np.dtype(dtype)
            except TypeError:
                raise ValueError(f"observation_spec[{key!r}]: {dtype!r} is not a numpy dtype") from None
        shape = None if shape is None else tuple(shape)
        out[str(key)] = (shape, dtype, True) if rest and rest[0] else (shape, dtype)
    return out


def _unknown_keys_hint(extra: list[Any], spec: ObservationSpec) -> str:
    """The unknown keys for an error message: at most `_HINT_KEYS` named (shortened), a "did you mean" only for
    short ones, the rest counted, so the work and the message stay bounded whatever the request holds."""
    hints = []
    for k in extra[:_HINT_KEYS]:
        text = str(k)
        if len(text) > _HINT_KEY_CHARS:
            hints.append(f"{text[:_HINT_KEY_CHARS]!r}... ({len(text)} characters)")
            continue
        close = difflib.get_close_matches(text, list(spec), n=1)
        hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
    if len(extra) > _HINT_KEYS:
        hints.append(f"and {len(extra) - _HINT_KEYS} more")
    return ", ".join(hints)


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _dtype_matches(dtype: np.dtype, want: str) -> bool:
    # One character is a dtype kind ("f" = any float); anything longer is an exact dtype ("float32").
    return dtype.kind == want if len(want) == 1 else dtype == np.dtype(want)


def validate_observation(obs: Any, spec: ObservationSpec, allow_extra_keys: bool = False) -> dict[str, Any]:
    """Check an observation against a spec; return it with lists/python numbers turned into numpy arrays.

    Every spec key is required. Strings stay `str`. Float/complex values must be finite.

    Args:
        obs: the decoded request, e.g. `{"images": uint8 (V, h, w, 3), "state": float32 (D_st,),
            "sensor": float32 (N, C_s), "sensor_timestamps": float64 (N,), "timestamp": float64 (),
            "instruction": str}`.
        spec: key -> (shape with None wildcards or None for any shape, dtype kind or exact dtype name).
        allow_extra_keys: pass keys absent from the spec through instead of rejecting them.

    Raises:
        ObservationError: naming the offending key, what was expected and what arrived.
    """
    if not isinstance(obs, dict):
        raise ObservationError(f"an observation must be a map of key -> value, got {type(obs).__name__}")
    missing = [k for k, entry in spec.items() if k not in obs and not is_optional(entry)]
    extra = [k for k in obs if k not in spec]
    problems = []
    if missing:
        problems.append(f"missing observation key(s) {missing}")
    if extra and not allow_extra_keys:
        problems.append(f"unexpected observation key(s) {_unknown_keys_hint(extra, spec)}")
    if problems:
        required = sorted(k for k, entry in spec.items() if not is_optional(entry))
        optional = sorted(k for k, entry in spec.items() if is_optional(entry))
        also = f" and optionally {optional}" if optional else ""
        raise ObservationError("; ".join(problems) + f"; the policy expects {required}{also}")
    out = dict(obs)
    for key, (shape, want, *_) in spec.items():
        if key not in obs:
            continue
        value = obs[key]
        try:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise ObservationError(
                f"observation key {key!r}: cannot read {type(value).__name__} as an array ({exc})"
            ) from None
        if not _dtype_matches(arr.dtype, want):
            wanted = f"kind {want!r}" if len(want) == 1 else want
            raise ObservationError(
                f"observation key {key!r}: expected dtype {wanted}, got {arr.dtype} (kind {arr.dtype.kind!r})"
            )
        if shape is not None and (
            arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape))
        ):
            raise ObservationError(
                f"observation key {key!r}: expected shape {_fmt_shape(shape)}, got {_fmt_shape(arr.shape)}"
            )
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise ObservationError(f"observation key {key!r}: {bad} non-finite value(s) (NaN or inf)")
        if not isinstance(value, str | np.ndarray | np.generic):
            out[key] = arr
    return out
