"""Latency benchmark structure on 3 iterations: one row per configuration, sane percentiles, ratios and the
markdown table (no timing thresholds: the CI machine's speed is not under test)."""

from __future__ import annotations

import math

import pytest

from sensorvla.eval.latency import STAGES, bench_latency, format_table, ratios


@pytest.fixture(scope="module")
def rows(tiny_vl_dir):
    return bench_latency(
        tiny_vl_dir, heads=("regression", "diffusion", "flow"), views=(1, 2), iters=3, warmup=1, image_size=56
    )


def test_one_row_per_configuration(rows):
    combos = {(r["head"], r["views"], r["mode"]) for r in rows}
    assert len(rows) == len(combos) == 3 * 2 * 2
    assert {m for _, _, m in combos} == {"full", "fast_slow"}
    assert all(r["iters"] == 3 and r["hz"] > 0 for r in rows)


def test_percentiles_are_monotone_and_stages_fit_in_the_total(rows):
    for r in rows:
        for s in STAGES:
            name = s[: -len("_ms")]
            assert 0.0 <= r[f"{name}_p50"] <= r[f"{name}_p99"], (r["head"], name)
            # total >= each stage on every call, so also at each percentile
            assert r[f"{name}_p50"] <= r["total_p50"] + 1e-9


def test_ratios_and_table(rows):
    rat = ratios(rows)
    assert set(rat) == {"diffusion_over_regression", "flow_over_regression", "full_over_fast_slow", "views_2_over_1"}
    assert all(math.isfinite(v) and v > 0 for v in rat.values())
    table = format_table(rows)
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| head ")]
    assert len(body) == len(rows)
    assert "| diffusion | 2 | fast_slow |" in table
    assert all(f"- {k}:" in table for k in rat)


def test_bench_latency_leaves_the_callers_random_state_alone(tiny_vl_dir):
    import torch

    torch.manual_seed(1234)
    want = torch.rand(3)
    torch.manual_seed(1234)
    bench_latency(tiny_vl_dir, heads=("regression",), views=(1,), modes=("full",), iters=1, warmup=0, image_size=56)
    assert torch.equal(torch.rand(3), want)  # the seeded init is local to the benchmark
