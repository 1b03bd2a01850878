"""msgpack-numpy packing (exact round trips, openpi wire compatibility) and observation validation."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sensorvla.serving import protocol
from sensorvla.serving.protocol import (
    ObservationError,
    PolicyServerError,
    packb,
    unpackb,
    validate_observation,
)

DTYPES = [
    "bool",
    "uint8",
    "uint16",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
    "complex64",
]


def assert_same_array(a, b):
    assert isinstance(b, np.ndarray)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (2, 3, 4)])
def test_array_round_trip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    arr = np.asarray(rng.standard_normal(shape) * 50).astype(dtype)
    out = unpackb(packb(arr))
    assert_same_array(arr, out)
    assert out.flags.writeable and out.flags.c_contiguous


def test_non_contiguous_and_fortran_arrays_round_trip_in_logical_order():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    for arr in (base.T, base[:, ::2], np.asfortranarray(base), base[::-1]):
        assert_same_array(arr, unpackb(packb(arr)))


def test_string_arrays_and_observation_dict_round_trip():
    rng = np.random.default_rng(1)
    obs = {
        "images": rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8),
        "state": rng.standard_normal(7).astype(np.float32),
        "sensor": rng.standard_normal((650, 4)).astype(np.float32),
        "sensor_timestamps": np.linspace(0.0, 1.0, 650),
        "timestamp": np.array(12.5),
        "instruction": "insert the needle",
        "names": np.array(["wrist", "front"]),
        "nested": {"a": [1, 2.5, "x", None, True], "b": {"c": np.int16(-3)}, "t": (1, 2)},
        "blob": b"\x00\x01",
    }
    out = unpackb(packb(obs))
    assert set(out) == set(obs)
    for key in ("images", "state", "sensor", "sensor_timestamps", "timestamp", "names"):
        assert_same_array(obs[key], out[key])
    assert out["instruction"] == "insert the needle"
    assert out["nested"] == {"a": [1, 2.5, "x", None, True], "b": {"c": -3}, "t": [1, 2]}
    assert type(out["nested"]["b"]["c"]) is np.int16  # numpy scalars keep their type
    assert out["blob"] == b"\x00\x01"


@pytest.mark.parametrize(
    "value",
    [np.float64(1.25), np.float32(-2.5), np.int64(2**40), np.uint8(255), np.bool_(True), np.str_("hi")],
)
def test_numpy_scalars_keep_dtype(value):
    out = unpackb(packb({"v": value}))["v"]
    assert type(out) is type(value) and out == value


def test_python_scalars_stay_python():
    out = unpackb(packb({"i": 3, "f": 0.5, "b": False, "s": "é", "n": None}))
    assert out == {"i": 3, "f": 0.5, "b": False, "s": "é", "n": None}
    assert type(out["f"]) is float and type(out["i"]) is int


def test_wire_format_is_openpi_msgpack_numpy():
    """Arrays are maps with bytes keys, exactly what openpi-client's msgpack_numpy writes and reads."""
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = msgpack.unpackb(packb({"actions": arr}), raw=False)
    enc = raw["actions"]
    assert enc == {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": "<f4", b"shape": [2, 3]}

    # openpi's packer (reproduced): bytes keys, shape tuple, np.generic as __npgeneric__.
    def openpi_pack(obj):
        if isinstance(obj, np.ndarray):
            return {
                b"__ndarray__": True,
                b"data": obj.tobytes(),
                b"dtype": obj.dtype.str,
                b"shape": obj.shape,
            }
        if isinstance(obj, np.generic):
            return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
        return obj

    payload = msgpack.packb({"state": arr, "k": np.int32(4), "prompt": "go"}, default=openpi_pack)
    out = unpackb(payload)
    assert_same_array(arr, out["state"])
    assert type(out["k"]) is np.int32 and out["k"] == 4 and out["prompt"] == "go"
    # str keys (the spelling in the brief) decode too
    str_keys = msgpack.packb({"__ndarray__": True, "data": arr.tobytes(), "dtype": "<f4", "shape": [2, 3]})
    assert_same_array(arr, unpackb(str_keys))


@pytest.mark.parametrize(
    ("encoded", "match"),
    [
        ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]}, "refusing"),
        ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|V8", b"shape": [1]}, "refusing"),
        ({b"__ndarray__": True, b"data": b"\x00" * 7, b"dtype": "<f4", b"shape": [2]}, "needs 8 bytes"),
        ({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "<f4", b"shape": [-2]}, "shape"),
        ({b"__ndarray__": True, b"data": b"\x00" * 8, b"shape": [2]}, "'dtype' field"),
    ],
)
def test_decoder_rejects_malformed_arrays(encoded, match):
    with pytest.raises(ValueError, match=match):
        unpackb(msgpack.packb(encoded))


def test_packb_rejects_unsendable_values_with_a_hint():
    with pytest.raises(TypeError, match="object"):
        packb({"x": np.array([object()], dtype=object)})
    with pytest.raises(TypeError, match="torch tensors"):
        packb({"x": {1, 2}})


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
    )
)
def test_round_trip_property(arr):
    out = unpackb(packb({"a": arr}))["a"]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()  # bitwise, so NaNs compare too


# ---------------------------------------------------------------------------------------- validation

SPEC = {
    "images": ((None, 8, 8, 3), "u"),
    "state": ((4,), "f"),
    "sensor": ((None, 5), "float32"),
    "timestamp": ((), "f"),
    "instruction": ((), "U"),
    "extra_any": (None, "i"),
}


def good_obs():
    return {
        "images": np.zeros((2, 8, 8, 3), np.uint8),
        "state": np.zeros(4, np.float32),
        "sensor": np.zeros((13, 5), np.float32),
        "timestamp": 1.5,
        "instruction": "go",
        "extra_any": np.arange(6).reshape(2, 3),
    }


def test_validate_accepts_and_converts_python_values():
    obs = good_obs()
    obs["state"] = [1.0, 2.0, 3.0, 4.0]
    out = validate_observation(obs, SPEC)
    assert isinstance(out["state"], np.ndarray) and out["state"].shape == (4,)
    assert isinstance(out["timestamp"], np.ndarray) and out["timestamp"].shape == ()
    assert out["instruction"] == "go" and out["images"] is obs["images"]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda o: o.pop("sensor"), r"missing observation key\(s\) \['sensor'\]"),
        (lambda o: o.update(sensr=o.pop("sensor")), r"'sensr' \(did you mean 'sensor'\?\)"),
        (lambda o: o.update(state=np.zeros(5, np.float32)), r"'state': expected shape \(4,\), got \(5,\)"),
        (lambda o: o.update(images=np.zeros((8, 8, 3), np.uint8)), r"expected shape \(\*, 8, 8, 3\)"),
        (lambda o: o.update(images=np.zeros((2, 8, 8, 3), np.float32)), r"'images': expected dtype kind 'u'"),
        (lambda o: o.update(sensor=np.zeros((13, 5), np.float64)), r"'sensor': expected dtype float32"),
        (lambda o: o.update(instruction=b"go"), r"'instruction': expected dtype kind 'U'"),
        (lambda o: o["sensor"].__setitem__((3, 1), np.nan), r"'sensor': 1 non-finite"),
        (lambda o: o.update(timestamp=math.inf), r"'timestamp': 1 non-finite"),
        (lambda o: o.update(state=[[1.0], [1.0, 2.0]]), r"'state': cannot read list"),
    ],
)
def test_validate_rejects_with_a_precise_message(mutate, match):
    obs = good_obs()
    mutate(obs)
    with pytest.raises(ObservationError, match=match):
        validate_observation(obs, SPEC)


def test_validate_extra_keys_and_non_dict():
    obs = good_obs() | {"prompt": "x"}
    with pytest.raises(ObservationError, match="unexpected observation key"):
        validate_observation(obs, SPEC)
    assert validate_observation(obs, SPEC, allow_extra_keys=True)["prompt"] == "x"
    with pytest.raises(ObservationError, match="must be a map"):
        validate_observation([1, 2], SPEC)


def test_spec_json_round_trip_and_error_messages():
    assert protocol.spec_from_json(unpackb(packb(protocol.spec_to_json(SPEC)))) == SPEC
    err = protocol.make_error("ObservationError", "bad", traceback="tb")
    with pytest.raises(PolicyServerError) as info:
        protocol.raise_if_error(unpackb(packb(err)))
    assert (info.value.type, info.value.message, info.value.traceback) == ("ObservationError", "bad", "tb")
    ok = {"actions": np.zeros((2, 2))}
    assert protocol.raise_if_error(ok) is ok


# --- issue 19: bounded decoding, bounded hints, optional keys, errors as text frames --------------------------


def _announce(kind: str, n: int, body: bytes = b"") -> bytes:
    """A msgpack header announcing n elements (map32/array32/str32) followed by `body`."""
    return {"map": b"\xdf", "array": b"\xdd", "str": b"\xdb"}[kind] + n.to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("name", "frame", "match"),
    [
        (
            "1,000,000-key map",
            _announce("map", 1_000_000, b"\x00" * 8),
            "a map of 1000000 keys, over .* max_map_len=64",
        ),
        ("30M-int list", _announce("array", 30_000_000, b"\x01" * 8), "a list of 30000000 elements"),
        ("300k-byte key", b"\x81" + _announce("str", 300_000, b"k" * 300_000) + b"\x00", "a string of 300000 bytes"),
        ("2 x 10,000 nested lists", packb({"s": [[0]] * 10_000, "t": [[0]] * 10_000}), "max_items=16384"),
        ("2 x 10,000 maps", packb({"s": [{"a": 1}] * 10_000, "t": [{"a": 1}] * 10_000}), "max_items=16384"),
    ],
)
def test_decode_limits_refuse_at_the_header(name, frame, match):
    with pytest.raises(protocol.LimitExceededError, match=match):
        unpackb(frame, protocol.DecodeLimits())
    with pytest.raises(ValueError, match="must be >= 4"):
        protocol.DecodeLimits(max_map_len=3)


def test_decode_limits_pass_a_real_observation_and_arrays_count_once():
    obs = good_obs() | {"big": np.zeros((1000, 1000), np.float32)}  # 1 item, however many elements
    out = unpackb(packb(obs), protocol.DecodeLimits())
    assert_same_array(obs["big"], out["big"]) and out["instruction"] == "go"


def test_unknown_key_hints_are_bounded_in_work_and_size():
    obs = good_obs() | {f"unknown_{i}": i for i in range(10_000)} | {"k" * 100_000: 1, "sensr": 0}
    with pytest.raises(ObservationError) as info:
        validate_observation(obs, SPEC)
    message = str(info.value)
    assert len(message) < 2_000 and "and 9994 more" in message
    obs = good_obs() | {"k" * 100_000: 1, "sensr": 0}
    message = str(pytest.raises(ObservationError, validate_observation, obs, SPEC).value)
    assert "(100000 characters)" in message and "'sensr' (did you mean 'sensor'?)" in message and len(message) < 2_000


def test_optional_spec_keys_may_be_left_out_but_are_checked_when_sent():
    spec = protocol.check_spec(SPEC | {"timestamp": ((), "f", True)})
    obs = good_obs()
    del obs["timestamp"]
    assert "timestamp" not in validate_observation(obs, spec)
    with pytest.raises(ObservationError, match="'timestamp': 1 non-finite"):
        validate_observation(good_obs() | {"timestamp": math.inf}, spec)
    assert protocol.spec_from_json(unpackb(packb(protocol.spec_to_json(spec)))) == spec
    assert (
        protocol.spec_to_json(spec)["timestamp"]["optional"] is True
        and "optional" not in protocol.spec_to_json(spec)["state"]
    )
    with pytest.raises(ValueError, match="third element must be a bool"):
        protocol.check_spec({"t": ((), "f", "yes")})


def test_errors_travel_as_text_frames_and_come_back_as_named_errors():
    text = protocol.error_text("ObservationError", "bad" * 10_000, traceback="tb")
    assert isinstance(text, str) and len(text) < protocol.ERROR_TEXT_MAX_CHARS + 200
    with pytest.raises(PolicyServerError) as info:
        protocol.raise_if_error(protocol.decode_reply(text))
    assert info.value.type == "ObservationError" and info.value.traceback == "tb"
    assert info.value.message.endswith("more characters]")
    openpi_traceback = "Traceback (most recent call last):\n  ...\nValueError: boom"  # what openpi's server sends
    with pytest.raises(PolicyServerError) as info:
        protocol.raise_if_error(protocol.decode_reply(openpi_traceback))
    assert info.value.type == "InternalError" and "boom" in info.value.message
    ok = {"actions": np.zeros((2, 2), np.float32)}
    assert_same_array(ok["actions"], protocol.raise_if_error(protocol.decode_reply(packb(ok)))["actions"])
