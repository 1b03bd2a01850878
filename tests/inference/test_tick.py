"""The runner's per-call model work (`FastTick`, inference/tick.py) traced by `torch.export` and compiled by
AOTInductor (`compile_model`) gives the eager actions within float rounding: for each head, with every grid point
measured, with gaps, without sensor data (a traced graph always applies the masks; eager skips them when all are
valid) and with another number of VL tokens (a dynamic dimension of the graph)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from sensorvla.eval.latency import _obs, _runner
from sensorvla.inference.runner import PolicyRunner
from sensorvla.inference.tick import dynamic_shapes, starting_noise


def tick_inputs(runner, obs, seed: int = 0):
    """The inputs `head_step` gives the tick for `obs` after a first call (the reused VL part)."""
    runner.infer(obs)
    _, vl_mask, v_proj, v_mem = runner._vl_projected
    raw, _ = runner.session.raw_sample(runner.check_request(obs))
    b = runner.batch_from_raw(raw, False)
    noise = starting_noise(runner.policy, v_proj, torch.Generator().manual_seed(seed))
    sensors = {k: b[k] for k in ("sensor", "sensor_mask", "has_sensor")}
    return [sensors, b["state"], v_proj, vl_mask, tuple(v_mem), noise]


def variants(inputs):
    """The inputs as they are, with a gap in the window, without sensor data, and with 3 VL tokens fewer."""
    gap = list(inputs)
    gap[0] = dict(inputs[0], sensor_mask=inputs[0]["sensor_mask"].clone())
    gap[0]["sensor_mask"][:, 5:12] = False
    none = list(inputs)
    none[0] = dict(inputs[0], has_sensor=torch.zeros_like(inputs[0]["has_sensor"]))
    fewer = list(inputs)
    fewer[2], fewer[3] = inputs[2][:, :-3], inputs[3][:, :-3]
    keys, values, mask = inputs[4]
    fewer[4] = (tuple(k[:, :, :-3] for k in keys), tuple(v[:, :, :-3] for v in values), mask[:, :-3])
    return {"measured": inputs, "gap": gap, "no_sensor": none, "fewer_vl_tokens": fewer}


@pytest.mark.parametrize("head", ["regression", "diffusion"])
def test_exported_tick_equals_eager(tiny_vl_dir, head):
    from torch.export import export

    runner = _runner(tiny_vl_dir, head, 1, "fast_slow", "cpu", 33, 56, (3, 2))
    inputs = tick_inputs(runner, _obs(1, 33, 56, np.random.default_rng(0)))
    with torch.no_grad():
        graph = export(runner.tick, tuple(inputs), dynamic_shapes=dynamic_shapes(inputs)).module()
        outputs = {}
        for name, args in variants(inputs).items():
            want, got = runner.tick(*args), graph(*args)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
            outputs[name] = want
    assert not torch.allclose(outputs["measured"], outputs["gap"])  # the variants do reach the output
    assert not torch.allclose(outputs["measured"], outputs["no_sensor"])


def has_cxx() -> bool:
    """A C++ compiler for inductor's generated code."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx(), reason="AOTInductor needs a C++ compiler (g++ / clang++)")
@pytest.mark.parametrize("head", ["regression", "flow"])
def test_compiled_runner_equals_eager_runner(tiny_vl_dir, head):
    """`PolicyRunner(compile_model=True)` on CPU: AOTInductor's library, over a run of calls (new samples, a
    changed instruction: another number of VL tokens), gives the eager runner's actions."""
    base = _runner(tiny_vl_dir, head, 1, "fast_slow", "cpu", 33, 56, (3, 2))
    eager, compiled = (
        PolicyRunner(
            base.policy,
            base.cfg,
            base.normalizer,
            base.processor,
            vl_refresh_every=2,
            max_vl_age_s=1e9,
            compile_model=c,
        )
        for c in (False, True)
    )
    assert compiled.compiles and not eager.compiles
    compiled.warm_up()  # exports and compiles before the first request
    assert compiled._exported is not None and compiled.session._vl is None
    obs = _obs(1, 33, 56, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for i in range(4):
        ts = obs["sensor_timestamps"][-1] + np.arange(1, 41) / 650.0
        obs = dict(obs, sensor=rng.normal(size=(40, 33)).astype(np.float32), sensor_timestamps=ts, timestamp=ts[-1])
        if i == 2:
            obs["instruction"] = "insert the needle slowly into the second layer"
        want, got = eager.infer(obs), compiled.infer(obs)
        assert got["vl_fresh"] == want["vl_fresh"] == (i % 2 == 0)
        np.testing.assert_allclose(got["actions"], want["actions"], atol=1e-5, rtol=1e-5, err_msg=f"call {i}")
    assert compiled._exported is not None and eager._exported is None


def test_warm_up_runs_a_call_and_leaves_the_default_session(tiny_vl_dir):
    """`warm_up` (what `sensorvla serve --runtime.compile` calls before serving) runs one VL pass and one tick on a
    blank observation in a throwaway session; the default session keeps no features and no samples."""
    runner = _runner(tiny_vl_dir, "regression", 1, "fast_slow", "cpu", 33, 56, (3, 2))
    assert runner.warm_up() > 0 and runner.vl_calls == 1
    assert runner.session._vl is None and len(runner.session.history) == 0
