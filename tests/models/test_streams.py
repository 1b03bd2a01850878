"""Declared sensor streams: the one-line form, every encoder kind (shapes, masks, missing tokens, dropout), a kind
being one file plus its registry line, and streams at different rates windowed causally side by side."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorvla.config import ConfigError, SensorConfig, SensorVLAConfig
from sensorvla.data.timeline import SensorWindow
from sensorvla.models.sensors import KINDS
from sensorvla.models.sensors.encoder import SensorEncoder
from sensorvla.streams import StreamSpec, StreamSpecError, model_streams, parse_stream

WINDOW = SensorWindow(0.1, 8, 0.025)
SHAPES = {"wrench": (6,), "profile1d": (32,), "taxel2d": (4, 4), "imu": (6,), "generic": (2, 3)}


def test_one_line_form_round_trips_and_bad_lines_are_named():
    spec = parse_stream("tactile=taxel2d,source=observation.tactile,shape=4x4,rate=100,tokens=2,dropout=0.1")
    assert spec == StreamSpec("tactile", "taxel2d", "observation.tactile", None, (4, 4), 100.0, tokens=2, dropout=0.1)
    assert parse_stream(spec.to_text()) == spec
    for bad, needle in [
        ("ft=wrench,chans=0:6", "unknown setting 'chans=0:6'"),
        ("ft=wrench,channels=6:2", "channels"),
        ("../x=wrench", "identifier"),
        ("ft=wrench,dropout=1.5", "dropout"),
    ]:
        with pytest.raises(StreamSpecError, match=needle):
            parse_stream(bad)
    cfg = SensorVLAConfig()
    cfg.data.streams = ("ft=wrench,tokens=two",)
    with pytest.raises(ConfigError, match="--data.streams: stream 'ft': tokens='two'"):
        cfg.validate()


def test_the_legacy_tensor_is_two_streams_unless_one_is_declared_on_it():
    legacy = model_streams((), 33, 1)
    assert [(s.name, s.kind, s.channels, s.shape, s.group) for s in legacy] == [
        ("force", "wrench", (0, 1), (1,), "sensor"),
        ("ascan", "profile1d", (1, 33), (32,), "sensor"),
    ]
    declared = model_streams(("ft=wrench,channels=0:6", "imu=imu,source=imu,shape=6"), 6, 1)
    assert [(s.name, s.channels, s.shape) for s in declared] == [("ft", (0, 6), (6,)), ("imu", None, (6,))]


def encoder(kind: str, **spec_kw) -> SensorEncoder:
    torch.manual_seed(0)
    spec = StreamSpec("x", kind, source="src", shape=SHAPES[kind], **spec_kw)
    return SensorEncoder(SensorConfig(num_tokens=3, hidden_dim=16, num_heads=2, dropout=0.0), [spec], WINDOW)


def batch(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[1, :5] = False  # sample 1: a gap
    mask[2] = False  # sample 2: no data at all
    return {"sensor.x": torch.randn(4, 8, *SHAPES[kind], generator=g), "sensor_mask.x": mask}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_shapes_masks_missing_token_and_dropout(kind):
    enc = encoder(kind).eval()
    b = batch(kind)
    with torch.no_grad():
        tok, tok_mask = enc(b)
        assert tok.shape == (4, 3, 16) and tok_mask.all() and torch.isfinite(tok).all()
        missing = enc.groups["x"].missing_tokens[0]
        assert torch.equal(tok[2], missing)  # no data: the learned tokens, not an encoding of zeros
        poked = dict(b, **{"sensor.x": b["sensor.x"].clone()})
        poked["sensor.x"][1, :5] = 1e3  # sample 1's masked points
        poked["sensor.x"][3] = -poked["sensor.x"][3]  # another sample
        out, _ = enc(poked)
    torch.testing.assert_close(out[1], tok[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], tok[0], atol=1e-5, rtol=0)
    assert not torch.allclose(out[3], tok[3])  # the encoding depends on the values
    dropping = encoder(kind, dropout=0.999).train()
    torch.manual_seed(1)
    dropped, _ = dropping(b)
    assert torch.equal(dropped.detach(), dropping.groups["x"].missing_tokens.expand(4, -1, -1).detach())
    dropped.sum().backward()  # the missing tokens train
    assert dropping.groups["x"].missing_tokens.grad.abs().sum() > 0
    with torch.no_grad():
        kept, _ = dropping.eval()(b)  # no dropout outside training
    assert not torch.equal(kept[0], dropping.groups["x"].missing_tokens[0])


def test_streams_of_their_own_add_their_tokens_and_a_kind_is_one_file():
    legacy = [s for s in model_streams((), 9, 1)]
    extra = [StreamSpec("imu", "imu", "imu", shape=(6,), samples=16), StreamSpec("tac", "taxel2d", "t", shape=(3, 3))]
    enc = SensorEncoder(SensorConfig(num_tokens=2, hidden_dim=16, num_heads=2), legacy + extra, WINDOW).eval()
    b = {
        "sensor": torch.randn(2, 8, 9),
        "sensor_mask": torch.ones(2, 8, dtype=torch.bool),
        "has_sensor": torch.ones(2) > 0,
    }
    b |= {"sensor.imu": torch.randn(2, 16, 6), "sensor_mask.imu": torch.ones(2, 16, dtype=torch.bool)}
    b |= {"sensor.tac": torch.randn(2, 8, 3, 3), "sensor_mask.tac": torch.ones(2, 8, dtype=torch.bool)}
    tok, _ = enc(b)
    assert tok.shape == (2, 6, 16) and list(enc.groups) == ["sensor", "imu", "tac"]
    assert enc.groups["imu"].time_pos.shape[1] == 16  # its own window grid
    with pytest.raises(StreamSpecError, match="unknown kind 'sonar'"):
        SensorEncoder(SensorConfig(), [StreamSpec("s", "sonar", "s", shape=(4,))], WINDOW)
    package = Path(inspect.getfile(SensorEncoder)).parent
    for kind, cls in KINDS.items():  # each kind is the one class of its own file
        assert Path(inspect.getfile(cls)) == package / f"{kind}.py"


def stream(rate: float, t_end: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ts = np.arange(0.0, t_end, 1 / rate) + rng.uniform(0, 0.2 / rate)
    return ts, rng.normal(size=(len(ts), 3)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(t=st.floats(0.05, 1.95), seed=st.integers(0, 1000))
def test_a_1khz_stream_beside_a_30hz_one_is_windowed_causally(t, seed):
    """Each stream on its own grid (`SensorWindow.of`); changing every sample after t changes neither window, and
    each grid point is measured iff a sample of its own stream lies within its gap tolerance before it."""
    fast, slow = (
        StreamSpec("imu", "imu", "imu", samples=100),
        StreamSpec("ft", "wrench", "ft", window_s=0.5, samples=15),
    )
    for spec, rate in ((fast, 1000.0), (slow, 30.0)):
        w = WINDOW.of(spec)
        ts, values = stream(rate, 2.0, seed)
        got, mask = w.resample(ts, values, t)
        future = values.copy()
        future[ts > t] = 1e6
        again, mask2 = w.resample(ts, future, t)
        np.testing.assert_array_equal(got, again)
        np.testing.assert_array_equal(mask, mask2)
        grid = t - w.window_s + w.window_s / w.samples * np.arange(1, w.samples + 1)
        before = np.searchsorted(ts, grid, side="right") - 1
        expect = (before >= 0) & (grid - ts[np.maximum(before, 0)] <= w.max_gap_s)
        np.testing.assert_array_equal(mask, expect)
        assert got.shape == (w.samples, 3) and np.all(got[~mask] == 0)


@pytest.mark.parametrize("shape", [(3,), (4, 4)])
def test_a_window_before_a_streams_first_sample_is_all_missing(shape):
    """A query before a stream's first sample (a sensor that starts late): no samples to read, an all-missing
    window of the stream's shape (a 2-D stream's empty slice used to fail to reshape)."""
    w = SensorWindow(0.1, 8, 0.02)
    ts = np.arange(0.3, 0.5, 0.01)
    values = np.ones((len(ts), *shape), np.float32)
    lo, hi = w.slice(ts, 0.05)
    assert lo == hi
    out, mask = w.resample(ts[lo:hi], values[lo:hi], 0.05)
    assert out.shape == (8, *shape) and not mask.any()
