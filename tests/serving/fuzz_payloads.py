"""Hostile and random requests for the serving fuzz test and `python benchmarks/run.py fuzz`.

Hypothesis draws the structure (which mutation, sizes, seeds); numpy fills the arrays from a drawn seed,
so 2,000 payloads take seconds to generate. Every case carries what the reply must be:
    "valid"      well-formed and in range: actions, all finite;
    "warned"     valid, but the sensor window is empty (a stale sensor): actions and a `SensorWindowEmpty` warning;
    "malformed"  wrong key, dtype, shape, order, size, bytes...: an error reply, never actions;
    "edge"       well-formed but extreme (state 1e20, sensor 1e30): either, but finite.
Issue 19 added hostile classes: huge maps, long keys, long and nested lists, the tokenizer's special tokens in
the instruction, and sensor clocks in the wrong unit or after the query time; each must be refused (0 silent
accepts). Errors arrive as text frames of JSON (`protocol.error_text`), replies as binary frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from sensorvla.inference.checks import RequestLimits
from sensorvla.serving import protocol

# Bounds of the fuzz server: small, so that over-limit payloads stay small and cheap to send.
FUZZ_LIMITS = RequestLimits(
    max_instruction_tokens=64, max_image_pixels=96 * 96, max_sensor_samples=256, max_history_samples=4096
)
# Every error type a reply may carry. Anything else (a KeyError, a ValueError from the processor, an
# InternalError) is an unhandled path and fails the fuzz test.
EXPECTED_ERRORS = {
    protocol.INVALID_MESSAGE,
    protocol.OBSERVATION_ERROR,
    protocol.LIMIT_EXCEEDED,
    protocol.NON_FINITE_OUTPUT,
    protocol.BUSY,
}


@dataclass(frozen=True)
class Shape:
    """What the served checkpoint expects (from the handshake metadata)."""

    views: int
    state_dim: int
    channels: int
    min_side: int = 28

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Shape:
        return cls(len(meta["views"]), int(meta["state_dim"]), int(meta["sensor_channels"]))


@dataclass
class FuzzCase:
    kind: str  # the mutation, for the counts
    expect: str  # "valid" | "malformed" | "edge"
    payload: bytes | str


def valid_obs(shape: Shape, seed: int, side: int, rows: int) -> dict[str, Any]:
    """A well-formed observation: views side x side, `rows` sensor samples ending at the query time."""
    rng = np.random.default_rng(seed)
    t = 10.0 + float(rng.uniform(0, 100))
    ts = t - (np.arange(rows)[::-1] / 650.0)
    return {
        "images": rng.integers(0, 256, (shape.views, side, side, 3), dtype=np.uint8),
        "state": rng.normal(0, 1, shape.state_dim).astype(np.float32),
        "sensor": rng.normal(0, 1, (rows, shape.channels)).astype(np.float32),
        "sensor_timestamps": ts.astype(np.float64),
        "timestamp": np.float64(t),
        "instruction": "insert the needle",
    }


def _mutations(shape: Shape) -> dict[str, tuple[str, Any]]:
    """name -> (expectation, fn(obs, rng) -> obs | bytes | str)."""
    lim = FUZZ_LIMITS

    def edit(**kw):
        return lambda o, r: {**o, **{k: (v(o, r) if callable(v) else v) for k, v in kw.items()}}

    def drop(key):
        return lambda o, r: {k: v for k, v in o.items() if k != key}

    def shuffled(o, r):
        ts = o["sensor_timestamps"].copy()
        if len(ts) < 2:
            return np.array([1.0, 0.5])
        i = int(r.integers(0, len(ts) - 1))
        ts[i], ts[i + 1] = ts[i + 1], ts[i]
        return ts

    def needs_rows(fn):  # mutations of the sensor need at least 2 rows to be wrong
        def wrapped(o, r):
            if len(o["sensor"]) < 2:
                o = {**o, "sensor": np.zeros((8, shape.channels), np.float32), "sensor_timestamps": np.arange(8.0)}
            return fn(o, r)

        return wrapped

    def with_rows(fn, n=8):  # clock mutations need rows ending at the query time
        def wrapped(o, r):
            if len(o["sensor"]) < 2:
                t = float(o["timestamp"])
                ts = t - np.arange(n)[::-1] / 650.0
                o = {**o, "sensor": np.zeros((n, shape.channels), np.float32), "sensor_timestamps": ts}
            return fn(o, r)

        return wrapped

    def many_keys(lo, hi):
        return lambda o, r: {**o, **{f"unknown_{i}": i for i in range(int(r.integers(lo, hi)))}}

    def long_key(o, r):
        return {**o, "k" * int(r.choice([1_000, 100_000, 300_000])): 1}

    def special(o, r):
        token = str(r.choice(SPECIAL_TOKENS))
        return {**o, "instruction": f"insert the needle {token} and stop"}

    v, c = shape.views, shape.channels
    return {
        "valid": ("valid", lambda o, r: o),
        "valid no sensor rows": ("valid", edit(sensor=np.zeros((0, c), np.float32), sensor_timestamps=np.zeros(0))),
        "valid unicode instruction": ("valid", edit(instruction="stecke die Nadel ein – 针 ✓")),
        "valid empty instruction": ("valid", edit(instruction="")),
        "valid float64 state": ("valid", edit(state=lambda o, r: o["state"].astype(np.float64))),
        "valid stale sensor": (
            "warned",
            # half the query time back (5-55 s: stale), never near 1000x (a query at 50.3 s over samples at 0.3 s
            # reads as a millisecond clock and is refused, rightly)
            with_rows(edit(sensor_timestamps=lambda o, r: o["sensor_timestamps"] - 0.5 * float(o["timestamp"]))),
        ),
        "valid without timestamp": ("valid", drop("timestamp")),
        "valid vision-only": (
            "valid",
            lambda o, r: {k: v for k, v in o.items() if k not in ("timestamp", "sensor", "sensor_timestamps")},
        ),
        # bytes and framing
        "garbage bytes": ("malformed", lambda o, r: r.bytes(int(r.integers(1, 400)))),
        "truncated": ("malformed", lambda o, r: protocol.packb(o)[: int(r.integers(1, 200))]),
        "text frame": ("malformed", lambda o, r: "obs as text"),
        "not a map": ("malformed", lambda o, r: protocol.packb([1, 2, 3])),
        "bad ndarray map": (
            "malformed",
            lambda o, r: protocol.packb(
                {**o, "state": {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [6]}}
            ),
        ),
        "object dtype map": (
            "malformed",
            lambda o, r: protocol.packb(
                {**o, "state": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}}
            ),
        ),
        "unknown control": ("malformed", lambda o, r: protocol.packb({protocol.CONTROL_KEY: "shutdown"})),
        "control not a str": ("malformed", lambda o, r: protocol.packb({protocol.CONTROL_KEY: 7})),
        # keys
        "missing images": ("malformed", drop("images")),
        "missing state": ("malformed", drop("state")),
        "missing sensor": ("malformed", drop("sensor")),
        "extra key": ("malformed", edit(actions=np.zeros(3))),
        # dtypes
        "uint16 images": ("malformed", edit(images=lambda o, r: o["images"].astype(np.uint16) * 257)),
        "float images": ("malformed", edit(images=lambda o, r: o["images"].astype(np.float32) / 255)),
        "int8 images": ("malformed", edit(images=lambda o, r: o["images"].astype(np.int8))),
        "int state": ("malformed", edit(state=lambda o, r: o["state"].astype(np.int32))),
        "bytes instruction": ("malformed", edit(instruction=b"insert")),
        "int instruction": ("malformed", edit(instruction=3)),
        "complex sensor": ("malformed", edit(sensor=lambda o, r: o["sensor"].astype(np.complex64))),
        # shapes
        "one view too many": ("malformed", edit(images=lambda o, r: np.concatenate([o["images"], o["images"][:1]]))),
        "grey images": ("malformed", edit(images=lambda o, r: o["images"][..., :1])),
        "state too long": ("malformed", edit(state=lambda o, r: np.zeros(shape.state_dim + 1, np.float32))),
        "sensor channels": ("malformed", edit(sensor=lambda o, r: np.zeros((len(o["sensor"]), c + 1), np.float32))),
        "2-D timestamps": ("malformed", edit(sensor_timestamps=lambda o, r: o["sensor_timestamps"][None])),
        "ragged views": ("malformed", edit(images=[np.zeros((32, 32, 3), np.uint8), np.zeros((40, 40, 3), np.uint8)])),
        # values
        "nan state": ("malformed", edit(state=lambda o, r: np.full(shape.state_dim, np.nan, np.float32))),
        "inf sensor": (
            "malformed",
            needs_rows(edit(sensor=lambda o, r: np.full(o["sensor"].shape, np.inf, np.float32))),
        ),
        "nan timestamp": ("malformed", edit(timestamp=np.float64(np.nan))),
        "nan sensor stamp": (
            "malformed",
            needs_rows(edit(sensor_timestamps=lambda o, r: np.r_[o["sensor_timestamps"][:-1], np.nan])),
        ),
        "state 1e300 float64": ("malformed", edit(state=np.full(shape.state_dim, 1e300))),
        "sensor 1e300 float64": ("malformed", needs_rows(edit(sensor=lambda o, r: np.full(o["sensor"].shape, 1e300)))),
        "rows vs timestamps": (
            "malformed",
            needs_rows(edit(sensor_timestamps=lambda o, r: o["sensor_timestamps"][:-1])),
        ),
        "shuffled timestamps": ("malformed", needs_rows(edit(sensor_timestamps=shuffled))),
        "repeated timestamps": (
            "malformed",
            needs_rows(
                edit(sensor_timestamps=lambda o, r: np.r_[o["sensor_timestamps"][:1], o["sensor_timestamps"][:-1]])
            ),
        ),
        "tiny images": ("malformed", edit(images=lambda o, r: o["images"][:, :1, : int(r.integers(1, 27))])),
        "aspect ratio": ("malformed", edit(images=np.zeros((v, 28, 28 * 200, 3), np.uint8))),
        # bounds
        "huge instruction": (
            "malformed",
            lambda o, r: {**o, "instruction": "x" * int(r.choice([5_000, 100_000, 2_000_000]))},
        ),
        "too many tokens": ("malformed", edit(instruction=" ".join(["insert"] * (lim.max_instruction_tokens + 10)))),
        "too many pixels": ("malformed", edit(images=np.zeros((v, 100, 100, 3), np.uint8))),
        "too many samples": (
            "malformed",
            edit(
                sensor=np.zeros((lim.max_sensor_samples + 1, c), np.float32),
                sensor_timestamps=np.arange(lim.max_sensor_samples + 1) / 650.0,
            ),
        ),
        # in range for the checks, absurd for the model
        "state 1e20": ("edge", edit(state=np.full(shape.state_dim, 1e20, np.float32))),
        "sensor 1e30": ("edge", needs_rows(edit(sensor=lambda o, r: np.full(o["sensor"].shape, 1e30, np.float32)))),
        "state -1e15": ("edge", edit(state=np.full(shape.state_dim, -1e15, np.float32))),
        "state 3e38": ("edge", edit(state=np.full(shape.state_dim, 3e38, np.float32))),
        # issue 19: hostile sizes (refused at the decoder's headers or with a bounded message)
        "huge map": ("malformed", many_keys(65, 3000)),
        "some unknown keys": ("malformed", many_keys(1, 50)),
        "long key": ("malformed", long_key),
        "long state list": ("malformed", edit(state=lambda o, r: [0] * int(r.choice([1_000, 100_000])))),
        "nested lists": ("malformed", edit(state=lambda o, r: [[0]] * int(r.integers(9_000, 16_000)))),
        # issue 19: control tokens and clocks
        "special token instruction": ("malformed", special),
        "sensor stamps in ms": (
            "malformed",
            with_rows(edit(sensor_timestamps=lambda o, r: o["sensor_timestamps"] * 1e3)),
        ),
        "query time in ms": ("malformed", with_rows(edit(timestamp=lambda o, r: o["timestamp"] * 1e3))),
        "both clocks in ms": (
            "malformed",
            with_rows(
                edit(
                    sensor_timestamps=lambda o, r: o["sensor_timestamps"] * 1e3,
                    timestamp=lambda o, r: o["timestamp"] * 1e3,
                )
            ),
        ),
        "all after the query": (
            "malformed",
            with_rows(edit(sensor_timestamps=lambda o, r: o["sensor_timestamps"] + 5)),
        ),
        "future stamps": ("malformed", with_rows(edit(sensor_timestamps=lambda o, r: o["sensor_timestamps"] + 1e6))),
    }


MUTATION_NAMES = tuple(_mutations(Shape(2, 6, 3)))
SPECIAL_TOKENS = ("<|image_pad|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")


@st.composite
def fuzz_cases(draw, shape: Shape) -> FuzzCase:
    """One request: a mutation of a random valid observation, packed (or raw bytes / text)."""
    name = draw(st.sampled_from(MUTATION_NAMES))
    expect, fn = _mutations(shape)[name]
    seed = draw(st.integers(0, 2**31 - 1))
    side = draw(st.integers(shape.min_side, 64))
    rows = draw(st.integers(0, 120))
    out = fn(valid_obs(shape, seed, side, rows), np.random.default_rng(seed))
    payload = out if isinstance(out, bytes | str) else protocol.packb(out)
    return FuzzCase(name, expect, payload)


def first_non_finite(obj: Any) -> str | None:
    """Where a reply holds NaN/inf (numbers anywhere inside), else None."""
    return protocol.first_non_finite(obj)


def judge(case: FuzzCase, raw_reply: bytes | str) -> str:
    """Check one reply against the case; return its outcome ("ok" or the error type).

    Raises:
        AssertionError: a crash-like reply, NaN/inf anywhere, actions for a malformed request, no actions
            for a valid one, or an error type outside EXPECTED_ERRORS.
    """
    reply = protocol.decode_reply(raw_reply)
    assert isinstance(reply, dict), f"{case.kind}: reply is not a map"
    assert isinstance(raw_reply, str) == ("error" in reply), f"{case.kind}: an error must be a text frame, only"
    bad = first_non_finite(reply)
    assert bad is None, f"{case.kind}: non-finite value at {bad}"
    if "actions" in reply:
        actions = np.asarray(reply["actions"])
        assert case.expect != "malformed", f"{case.kind}: actions for a malformed request"
        assert actions.ndim == 2 and np.isfinite(actions).all()
        if case.expect == "warned":
            types = [w.get("type") for w in reply.get("warnings", [])]
            assert "SensorWindowEmpty" in types, f"{case.kind}: an empty sensor window without a warning"
        return "ok"
    err = reply.get("error")
    assert isinstance(err, dict), f"{case.kind}: neither actions nor error: {sorted(reply)}"
    assert err["type"] in EXPECTED_ERRORS, f"{case.kind}: unexpected error {err['type']}: {err.get('message')}"
    refused_valid = case.expect in ("valid", "warned") and err["type"] != protocol.BUSY
    assert not refused_valid, f"{case.kind}: valid request refused: {err}"
    return str(err["type"])


def make_fuzz_runner(vl_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path, head: str = "regression"):
    """An untrained checkpoint on `dataset_dir`, saved and loaded like a trained one, with FUZZ_LIMITS."""
    import torch

    from sensorvla.config import SensorVLAConfig, resolve_from_meta
    from sensorvla.data.format import load_meta
    from sensorvla.data.normalize import compute_stats
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.models.folder import save_pretrained
    from sensorvla.models.policy import build_policy

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.head.type = head
    cfg.model.head.num_inference_steps = 2
    cfg.data.dataset_dir = str(dataset_dir)
    cfg = resolve_from_meta(cfg, load_meta(dataset_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = build_policy(cfg)
    ckpt = save_pretrained(policy, Path(out_dir) / "pretrained_model", cfg, compute_stats(dataset_dir, progress=False))
    return PolicyRunner.from_pretrained(ckpt, limits=FUZZ_LIMITS)
