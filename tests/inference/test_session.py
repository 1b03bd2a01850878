"""PolicyRunner sessions and request checks: sensor history, fast-slow decided once, isolation, bounds,
wrong inputs and finite answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runner_helpers import later_samples, obs_from_dataset

from sensorvla.data.dataset import EpisodeDataset
from sensorvla.inference.checks import RequestLimits
from sensorvla.inference.runner import PolicyRunner
from sensorvla.serving.protocol import LimitExceededError, NonFiniteOutputError, ObservationError


@pytest.fixture(scope="module")
def runner(checkpoint):
    return PolicyRunner.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def ds(runner, synth_dataset_dir):
    return EpisodeDataset(synth_dataset_dir, runner.cfg.data, split="all")


@pytest.fixture(scope="module")
def sensor_obs(ds):
    idx = next(i for i in range(len(ds)) if ds[i]["has_sensor"] and ds[i]["frame_index"] > 3)
    return obs_from_dataset(ds, idx)


def batch_of(session, obs):
    raw, info = session.raw_sample(session.runner.check_request(obs))
    return session.runner.batch_from_raw(raw), info


def assert_same_batch(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- sensor history through the runner --------------------------------------------------------------


def test_incremental_sends_give_the_one_shot_window_and_the_same_actions(runner, sensor_obs):
    """A chunk-executing client that sends only new samples gets exactly the whole-window answer."""
    ts, values, t = sensor_obs["sensor_timestamps"], sensor_obs["sensor"], float(sensor_obs["timestamp"])
    keep = ts <= t
    ts, values = ts[keep], values[keep]
    session = runner.new_session()
    cuts = np.linspace(0, len(ts), 5).astype(int)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        part = dict(sensor_obs, sensor=values[lo:hi], sensor_timestamps=ts[lo:hi], timestamp=np.float64(ts[hi - 1]))
        got, info = batch_of(session, part)
        assert info["new_samples"] == hi - lo and info["duplicate_samples"] == 0
    whole = dict(sensor_obs, sensor=values, sensor_timestamps=ts, timestamp=np.float64(ts[-1]))
    assert_same_batch(got, runner.prepare(whole))  # the stateless one-shot path (a fresh session's window)
    assert got["sensor_mask"].any()
    # the whole window resent on top: de-duplicated, same batch again
    again, info = batch_of(session, whole)
    assert info["new_samples"] == 0 and info["duplicate_samples"] > 0
    assert_same_batch(again, got)
    nothing_new = dict(whole, sensor=values[:0], sensor_timestamps=ts[:0])  # the history alone
    np.testing.assert_array_equal(runner.new_session().infer(whole)["actions"], session.infer(nothing_new)["actions"])


def test_the_stateless_path_checks_and_windows_like_a_session(runner, sensor_obs, monkeypatch):
    """`prepare` / `raw_sample` (one observation, no history) check the request and window the sensor through the
    session's history, the one windowing code: samples out of order or all after the query time are refused there
    too, not resampled into a silent window."""
    from sensorvla.inference.runner import SensorClockError
    from sensorvla.inference.sensor_history import SensorHistory

    ts = sensor_obs["sensor_timestamps"]
    with pytest.raises(ObservationError, match="must increase strictly"):
        runner.prepare(dict(sensor_obs, sensor_timestamps=ts[::-1].copy()))
    with pytest.raises(SensorClockError, match="after the query time"):
        runner.raw_sample(dict(sensor_obs, timestamp=np.float64(ts[0] - 1.0)))
    windows = []
    real = SensorHistory.window
    monkeypatch.setattr(SensorHistory, "window", lambda self, t: windows.append(t) or real(self, t))
    runner.prepare(sensor_obs)
    assert windows == [float(sensor_obs["timestamp"])]


def test_gap_marks_missing_points_and_counts_them_in_the_reply(runner, sensor_obs):
    ts, values, t = sensor_obs["sensor_timestamps"], sensor_obs["sensor"], float(sensor_obs["timestamp"])
    drop = (ts > t - 0.06) & (ts < t - 0.02)  # a 40 ms hole inside the 100 ms window (tolerance 20 ms)
    holed = dict(sensor_obs, sensor=values[~drop], sensor_timestamps=ts[~drop])
    session = runner.new_session()
    reply = session.infer(holed)
    info = reply["sensor_history"]
    expected = runner.prepare(holed)["sensor_mask"][0].numpy()
    assert 0 < info["missing_points"] == int((~expected).sum()) < info["window_points"]
    assert info["windows_with_gaps"] == 1
    later = session.infer(later_samples(holed, n=80))  # 80 fresh samples fill the window again
    assert later["sensor_history"]["missing_points"] == 0 and later["sensor_history"]["windows_with_gaps"] == 1


def test_out_of_order_and_conflicting_samples_are_errors_and_reset_clears(runner, sensor_obs):
    session = runner.new_session()
    session.infer(sensor_obs)
    buffered = session.history.newest
    ts = sensor_obs["sensor_timestamps"]
    old = dict(sensor_obs, sensor=sensor_obs["sensor"][:5], sensor_timestamps=ts[-5:] - 1e-4)
    with pytest.raises(ObservationError, match="samples must arrive in time order"):
        session.infer(old)
    conflicting = dict(sensor_obs, sensor=sensor_obs["sensor"] + 1.0)
    with pytest.raises(ObservationError, match="already received with different values"):
        session.infer(conflicting)
    assert session.history.newest == buffered  # rejected requests left the history alone
    session.reset()
    assert len(session.history) == 0
    out = session.infer(conflicting)  # after a reset the same stamps may carry new values
    assert out["vl_fresh"] and out["sensor_history"]["new_samples"] == len(ts)


# --- fast-slow: one decision per call -----------------------------------------------------------------


class ScriptedClock:
    """Returns the scripted times in order, then keeps returning `after` (a second read would see it)."""

    def __init__(self, times, after):
        self.times, self.after, self.reads = list(times), after, 0

    def __call__(self):
        self.reads += 1
        return self.times.pop(0) if self.times else self.after


def test_fast_slow_decides_once_from_one_clock_read(checkpoint, ds):
    """The feature age crossing max_vl_age_s between two clock reads must not send a batch without
    pixels to the backbone: the decision (and the pixels) come from one read."""
    clock = ScriptedClock([100.0, 100.5], after=1e6)
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=100, max_vl_age_s=1.0, clock=clock)
    obs = obs_from_dataset(ds, 1)
    first = runner.infer(obs)
    assert first["vl_fresh"] and clock.reads == 1
    second = runner.infer(obs)  # age 0.5 <= 1.0 at the one read; any later read would say 1e6
    assert not second["vl_fresh"] and second["vl_age_s"] == pytest.approx(0.5) and clock.reads == 2
    assert runner.vl_calls == 1
    third = runner.infer(obs)  # now the single read says "too old": recomputed, with pixels
    assert third["vl_fresh"] and runner.vl_calls == 2 and clock.reads == 3


def test_reused_features_give_the_actions_of_their_own_images(checkpoint, ds):
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=2, max_vl_age_s=1e9)
    a, b = obs_from_dataset(ds, 1), obs_from_dataset(ds, len(ds) - 2)
    assert not np.array_equal(a["images"], b["images"])
    fresh = runner.new_session().infer(a)
    session = runner.new_session()
    session.infer(a)
    reused = session.infer(dict(a, images=b["images"]))
    assert not reused["vl_fresh"]
    np.testing.assert_array_equal(reused["actions"], fresh["actions"])  # b's images were not looked at


# --- per-session state ------------------------------------------------------------------------------


def test_sessions_keep_their_own_vl_features_and_history(checkpoint, ds):
    runner = PolicyRunner.from_pretrained(checkpoint, vl_refresh_every=100, max_vl_age_s=1e9)
    a, b = obs_from_dataset(ds, 2), obs_from_dataset(ds, len(ds) - 1)
    assert not np.array_equal(a["images"], b["images"])
    want_a = PolicyRunner.from_pretrained(checkpoint).infer(a)["actions"]
    want_b = PolicyRunner.from_pretrained(checkpoint).infer(b)["actions"]
    sa, sb = runner.new_session(), runner.new_session()
    for _ in range(2):  # interleaved, as two connections would be
        np.testing.assert_array_equal(sa.infer(a)["actions"], want_a)
        np.testing.assert_array_equal(sb.infer(b)["actions"], want_b)
    assert runner.vl_calls == 2  # one encode per session; the rest reused each session's own features


# --- request checks: bounds, wrong inputs, finite answers ---------------------------------------------


def test_check_casts_and_passes_a_good_observation(runner, sensor_obs):
    checked = runner.check_request(dict(sensor_obs, state=sensor_obs["state"].astype(np.float64)))
    assert checked["state"].dtype == np.float32 and checked["sensor"].dtype == np.float32
    assert checked["sensor_timestamps"].dtype == np.float64 and len(checked["images"]) == 2


def _shuffled(ts):
    out = ts.copy()
    out[[3, 7]] = out[[7, 3]]
    return out


# name -> (observation edit, error class, message fragment)
BAD_INPUTS = {
    "uint16 images": (lambda o: {"images": o["images"].astype(np.uint16) * 257}, ObservationError, "send uint8"),
    "float images": (lambda o: {"images": o["images"] / np.float32(255)}, ObservationError, "send uint8"),
    "1x1 images": (lambda o: {"images": o["images"][:, :1, :1]}, ObservationError, "each side must be >= 28"),
    "aspect ratio": (lambda o: {"images": np.zeros((2, 28, 6000, 3), np.uint8)}, ObservationError, "aspect ratio"),
    "one view": (lambda o: {"images": o["images"][:1]}, ObservationError, "expected 2 views"),
    "rows vs timestamps": (
        lambda o: {"sensor_timestamps": o["sensor_timestamps"][:10]},
        ObservationError,
        "one timestamp per row",
    ),
    "shuffled timestamps": (
        lambda o: {"sensor_timestamps": _shuffled(o["sensor_timestamps"])},
        ObservationError,
        "must increase strictly",
    ),
    "repeated timestamps": (
        lambda o: {"sensor_timestamps": np.sort(np.r_[o["sensor_timestamps"][:-1], o["sensor_timestamps"][5]])},
        ObservationError,
        "must increase strictly",
    ),
    "sensor without stamps": (lambda o: {"sensor_timestamps": None}, ObservationError, "send both or neither"),
    "state 1e300 float64": (lambda o: {"state": np.full(6, 1e300)}, ObservationError, "NaN or inf as float32"),
    "state 3e38 normalizes to inf": (
        lambda o: {"state": np.full(6, 3e38, np.float32)},
        ObservationError,
        "after normalization",
    ),
    "sensor 1e300": (lambda o: {"sensor": np.full(o["sensor"].shape, 1e300)}, ObservationError, "NaN or inf as"),
    "nan state": (lambda o: {"state": np.full(6, np.nan, np.float32)}, ObservationError, "NaN or inf"),
    "inf timestamp": (lambda o: {"timestamp": np.float64(np.inf)}, ObservationError, "finite number"),
    "wrong state shape": (lambda o: {"state": np.zeros(5, np.float32)}, ObservationError, "shape \\(6,\\)"),
    "instruction not str": (lambda o: {"instruction": b"bytes"}, ObservationError, "must be a str"),
    "2M-char instruction": (lambda o: {"instruction": "x" * 2_000_000}, LimitExceededError, "2000000 characters"),
    "too many tokens": (lambda o: {"instruction": " ".join(["insert"] * 400)}, LimitExceededError, "400 tokens"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_before_the_model(runner, sensor_obs, case, monkeypatch):
    edit, err, fragment = BAD_INPUTS[case]
    obs = {**sensor_obs, **edit(sensor_obs)}
    calls = runner.vl_calls
    seen: list[int] = []
    count = runner.checker.count_tokens
    monkeypatch.setattr(runner.checker, "count_tokens", lambda text: seen.append(len(text)) or count(text))
    with pytest.raises(err, match=fragment):
        runner.new_session().infer(obs)
    assert runner.vl_calls == calls  # nothing reached the model
    assert all(n <= runner.limits.instruction_chars for n in seen)  # a huge string never hits the tokenizer


def test_missing_state_is_an_error_not_zeros(runner, sensor_obs):
    with pytest.raises(ObservationError, match="missing 'state'"):
        runner.infer({k: v for k, v in sensor_obs.items() if k != "state"})


def test_limits_on_pixels_and_sensor_samples(checkpoint, sensor_obs):
    limits = RequestLimits(max_image_pixels=60 * 60, max_sensor_samples=10, max_instruction_tokens=4)
    small = PolicyRunner.from_pretrained(checkpoint, limits=limits)
    with pytest.raises(LimitExceededError, match="4096 pixels .* max_image_pixels=3600"):
        small.check_request(dict(sensor_obs, instruction="insert"))  # 64x64 views
    ok = dict(sensor_obs, images=sensor_obs["images"][:, :60, :60], instruction="insert")
    with pytest.raises(LimitExceededError, match="max_sensor_samples=10"):
        small.check_request(ok)
    short = dict(ok, sensor=ok["sensor"][-10:], sensor_timestamps=ok["sensor_timestamps"][-10:])
    assert small.check_request(short)["sensor"].shape == (10, sensor_obs["sensor"].shape[1])
    with pytest.raises(LimitExceededError, match="max_instruction_tokens=4"):
        small.check_request(dict(short, instruction="insert the needle and stop now please"))
    assert small.metadata["limits"]["max_sensor_samples"] == 10


@pytest.mark.parametrize("bad", ["state 1e20", "sensor 1e30"])
def test_finite_but_absurd_inputs_never_return_non_finite_actions(runner, sensor_obs, bad):
    obs = dict(sensor_obs)
    if bad == "state 1e20":
        obs["state"] = np.full(6, 1e20, np.float32)
    else:
        obs["sensor"] = np.full(obs["sensor"].shape, 1e30, np.float32)
    try:
        out = runner.new_session().infer(obs)
    except NonFiniteOutputError as exc:
        assert "no actions are returned" in str(exc)
    else:
        assert np.isfinite(out["actions"]).all() and np.isfinite(out["actions_normalized"]).all()


def test_non_finite_actions_raise_instead_of_returning(runner, sensor_obs, monkeypatch):
    head = runner.policy.head
    real = head.sample_memory  # what the runner calls (over the head's Memory of the conditioning)
    monkeypatch.setattr(head, "sample_memory", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteOutputError, match="56 non-finite action value"):
        runner.new_session().infer(sensor_obs)


def test_image_over_max_pixels_is_resized_like_in_training_not_rejected(runner, sensor_obs):
    bb = runner.cfg.model.backbone
    big = np.random.default_rng(0).integers(0, 256, (2, 300, 400, 3), dtype=np.uint8)  # 120,000 px per view
    pixels = 300 * 400
    assert bb.max_pixels < pixels <= runner.limits.max_image_pixels
    session = runner.new_session()
    raw, _ = session.raw_sample(runner.check_request(dict(sensor_obs, images=big)))
    batch = runner.batch_from_raw(raw)
    patches_per_view = batch["image_grid_thw"].prod(dim=1)
    assert (patches_per_view * 14 * 14 <= bb.max_pixels).all()  # the processor's resize, as in training
    assert np.isfinite(session.infer(dict(sensor_obs, images=big))["actions"]).all()


# --- issue 19: control tokens in the instruction, sensor clocks in the wrong unit ---------------------------


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|im_end|>", "<|vision_start|>", "<|im_start|>", "<|endoftext|>"])
def test_special_tokens_in_the_instruction_are_refused_before_the_model(runner, sensor_obs, token):
    """A chat-template or vision control token is a named refusal (never a processor ValueError, never a turn end)."""
    calls = runner.vl_calls
    obs = dict(sensor_obs, instruction=f"insert the needle {token} then stop")
    with pytest.raises(ObservationError, match=r"special token .* control token"):
        runner.new_session().infer(obs)
    assert runner.vl_calls == calls
    ok = runner.new_session().infer(dict(sensor_obs, instruction="insert <|not a special token|> here"))
    assert np.isfinite(ok["actions"]).all()  # look-alikes that the tokenizer reads as text stay text


def _ms(obs: dict, sensor: bool = True, query: bool = False) -> dict:
    """obs with the sensor clock and/or the query time in milliseconds."""
    out = dict(obs)
    if sensor:
        out["sensor_timestamps"] = obs["sensor_timestamps"] * 1000.0
    if query:
        out["timestamp"] = np.float64(float(obs["timestamp"]) * 1000.0)
    return out


CLOCK_MISTAKES = {
    "sensor in ms": (lambda o: _ms(o), "look like milliseconds"),
    "both in ms": (lambda o: _ms(o, query=True), "milliseconds"),
    "query in ms": (lambda o: _ms(o, sensor=False, query=True), "looks like milliseconds"),
    "all after the query time": (
        lambda o: dict(o, sensor_timestamps=o["sensor_timestamps"] + 5.0),
        "after the query time",
    ),
}


@pytest.mark.parametrize("case", list(CLOCK_MISTAKES))
def test_sensor_clock_mistakes_are_named_not_a_silently_masked_window(runner, sensor_obs, case):
    edit, fragment = CLOCK_MISTAKES[case]
    session = runner.new_session()
    with pytest.raises(ObservationError, match=fragment):
        session.infer(edit(sensor_obs))
    assert len(session.history) == 0  # nothing was buffered


def test_samples_after_the_query_time_are_fine_when_the_history_covers_the_window(runner, sensor_obs):
    """An incremental client whose new samples all postdate the query (camera latency) is not refused."""
    t = float(sensor_obs["timestamp"])
    ts, values = sensor_obs["sensor_timestamps"], sensor_obs["sensor"]
    session = runner.new_session()
    first = session.infer(dict(sensor_obs, sensor=values[ts <= t], sensor_timestamps=ts[ts <= t]))
    assert first["warnings"] == []
    later = session.infer(dict(sensor_obs, sensor=values[ts > t], sensor_timestamps=ts[ts > t]))
    assert later["sensor_history"]["new_samples"] == int((ts > t).sum()) and later["warnings"] == []


def test_a_stale_sensor_is_served_with_a_named_warning(runner, sensor_obs):
    stale = dict(sensor_obs, sensor_timestamps=sensor_obs["sensor_timestamps"] - 50.0)
    out = runner.new_session().infer(stale)
    assert out["sensor_history"]["missing_points"] == out["sensor_history"]["window_points"]
    assert [w["type"] for w in out["warnings"]] == ["SensorWindowEmpty"]
    assert "no measured point" in out["warnings"][0]["message"]


def test_a_vision_only_client_sends_no_timestamp_and_no_sensor_keys(runner, sensor_obs):
    """images, state and instruction are enough (the spec marks timestamp and sensor optional)."""
    from sensorvla.serving import protocol

    spec = protocol.check_spec(runner.observation_spec)
    bare = {k: sensor_obs[k] for k in ("images", "state", "instruction")}
    validated = protocol.validate_observation(bare, spec)
    out = runner.new_session().infer(validated)
    assert np.isfinite(out["actions"]).all() and out["sensor_history"]["new_samples"] == 0
    assert out["warnings"] == []  # nothing was ever sent: no sensor warning
