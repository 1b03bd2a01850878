"""Latency benchmark structure on 3 iterations: one row per configuration, sane percentiles, the head alone
timed per head, ratios, the goals table and the `sensorvla bench latency` CLI (no timing thresholds: the CI
machine's speed is not under test)."""

from __future__ import annotations

import math

import pytest

from sensorvla.eval.latency import STAGES, bench_latency, format_table, ratios, targets


@pytest.fixture(scope="module")
def rows(tiny_vl_dir):
    return bench_latency(
        tiny_vl_dir,
        heads=("regression", "diffusion", "flow"),
        views=(1, 2),
        iters=3,
        warmup=1,
        image_size=56,
        steps=(4, 2),
        threads=(1,),  # the goals are named per thread count; the default (current setting) varies by machine
    )


def test_one_row_per_configuration(rows):
    combos = {(r["head"], r["views"], r["mode"]) for r in rows}
    assert len(rows) == len(combos) == 3 * 2 * 2
    assert {m for _, _, m in combos} == {"full", "fast_slow"}
    assert all(r["iters"] == 3 and r["hz"] > 0 and r["hz_cpu"] > 0 for r in rows)
    assert {r["head"]: r["steps"] for r in rows} == {"regression": None, "diffusion": 4, "flow": 2}


def test_percentiles_are_monotone_and_stages_fit_in_the_total(rows):
    for r in rows:
        for s in STAGES:
            name = s[: -len("_ms")]
            assert 0.0 <= r[f"{name}_p50"] <= r[f"{name}_p99"], (r["head"], name)
            # total >= each stage on every call, so also at each percentile
            assert r[f"{name}_p50"] <= r["total_p50"] + 1e-9


def test_the_head_alone_is_timed_once_per_head_and_views(rows):
    timed = [r for r in rows if "head_alone_p50" in r]
    assert {(r["head"], r["views"]) for r in timed} == {
        (h, v) for h in ("regression", "diffusion", "flow") for v in (1, 2)
    }
    assert all(r["mode"] == "full" and 0 < r["head_alone_p50"] <= r["head_alone_p99"] for r in timed)


def test_steps_reach_the_sampler(tiny_vl_dir, monkeypatch):
    from sensorvla.models.heads.flow import FlowHead

    seen = []
    original = FlowHead.sample

    def spy(self, cond, cond_mask, generator=None, num_steps=None):
        seen.append(num_steps or self.cfg.num_inference_steps)
        return original(self, cond, cond_mask, generator, num_steps)

    monkeypatch.setattr(FlowHead, "sample", spy)
    bench_latency(
        tiny_vl_dir, heads=("flow",), views=(1,), modes=("full",), iters=1, warmup=0, image_size=56, steps=(9, 3)
    )
    assert seen and set(seen) == {3}


def test_ratios_targets_and_table(rows):
    rat = ratios(rows)
    assert {"diffusion_over_regression", "flow_over_regression", "full_over_fast_slow", "views_2_over_1"} <= set(rat)
    assert {"head_alone_diffusion_over_regression", "head_alone_flow_over_regression"} <= set(rat)
    assert all(math.isfinite(v) and v > 0 for v in rat.values())
    goals = targets(rows)
    names = [g["name"] for g in goals]
    assert any(n.startswith("P4 head alone DDIM-4 / regression, tiny, 1 view") for n in names)
    assert any(n.startswith("P4 head alone flow-2 / regression, tiny, 2 view") for n in names)
    assert any(n.startswith("sensor loop Hz (wall)") for n in names)
    assert not any(n.startswith("P3") for n in names)  # no VL-dominant rows: that goal is left out
    for g in goals:
        assert g["met"] == (g["value"] <= g["target"] if str(g["op"]) == "<=" else g["value"] >= g["target"])
    table = format_table(rows, with_targets=True)
    body = [line for line in table.splitlines() if " | tiny | " in line]
    assert len(body) == len(rows)
    assert f"| diffusion | 2 | fast_slow | 4 | {rows[0]['threads']} | tiny |" in table
    assert all(f"- {k}:" in table for k in rat)
    assert all(g["name"] in table for g in goals) and ("| met |" in table or "| MISSED |" in table)


def test_p3_is_computed_on_the_vl_dominant_rows(rows):
    relabelled = [{**r, "config": "vl_dominant"} for r in rows if r["views"] == 1]
    goals = {g["name"]: g for g in targets(rows + relabelled)}
    p3 = goals["P3 fast-slow / full, regression, VL-dominant, 1 view(s), 1 thread(s)"]
    reg = [r for r in relabelled if r["head"] == "regression"]
    fast = next(r["total_p50"] for r in reg if r["mode"] == "fast_slow")
    full = next(r["total_p50"] for r in reg if r["mode"] == "full")
    assert p3["value"] == pytest.approx(fast / full)


def test_bench_latency_leaves_the_callers_random_state_and_threads_alone(tiny_vl_dir):
    import torch

    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    want = torch.rand(3)
    torch.manual_seed(1234)
    out = bench_latency(
        tiny_vl_dir, heads=("regression",), views=(1,), modes=("full",), iters=1, warmup=0, image_size=56, threads=(1,)
    )
    assert torch.equal(torch.rand(3), want)  # the seeded init is local to the benchmark
    assert torch.get_num_threads() == threads and out[0]["threads"] == 1


def test_cli_prints_the_threads_the_table_and_the_goals(tiny_vl_dir, monkeypatch, capsys):
    """`sensorvla bench latency` parses --steps / --threads / --no-vl-dominant and prints the goals table."""
    from sensorvla import cli
    from sensorvla.eval import latency

    seen = {}
    real = latency.bench_latency

    def small(vl_model, **kw):
        seen.update(kw)
        kw.update(iters=1, views=(1,), heads=("regression", "flow"), image_size=56)
        return real(vl_model, **kw)

    monkeypatch.setattr(latency, "bench_latency", small)
    argv = ["bench", "latency", "--vl-model", str(tiny_vl_dir), "--steps", "6", "3", "--threads", "1"]
    assert cli.main([*argv, "--no-vl-dominant"]) == 0
    out = capsys.readouterr().out
    assert seen["steps"] == (6, 3) and seen["threads"] == (1,) and seen["config"] == "tiny"
    assert out.startswith("torch threads:")
    assert "| flow | 1 | fast_slow | 3 | 1 | tiny |" in out and "| goal | measured | target | |" in out


def test_cli_times_a_trained_checkpoint_as_served(tiny_vl_dir, synth_dataset_dir, tmp_path, capsys):
    """`sensorvla bench latency --checkpoint DIR`: the folder's own views, sensor and head, full and fast-slow;
    the fast-slow rows reuse the VL features (no VL time after the warm-up) and the threads are restored."""
    import torch

    from sensorvla import cli
    from sensorvla.config import SensorVLAConfig, resolve_from_meta
    from sensorvla.data.format import load_meta
    from sensorvla.data.normalize import compute_stats
    from sensorvla.models.folder import save_pretrained
    from sensorvla.models.policy import build_policy

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model, cfg.data.dataset_dir = str(tiny_vl_dir), str(synth_dataset_dir)
    cfg.model.head.type, cfg.model.head.num_inference_steps = "flow", 2
    cfg = resolve_from_meta(cfg, load_meta(synth_dataset_dir))
    save_pretrained(build_policy(cfg), tmp_path / "pretrained_model", cfg, compute_stats(synth_dataset_dir))
    before = torch.get_num_threads()
    argv = ["bench", "latency", "--checkpoint", str(tmp_path / "pretrained_model"), "--iters", "2"]
    assert cli.main([*argv, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == before
    assert "| flow | 2 | full | 2 | 1 | checkpoint |" in out and "| flow | 2 | fast_slow | 2 | 1 | checkpoint |" in out
    assert "full_over_fast_slow" in out and "nan" not in out

    from sensorvla.eval.latency import bench_checkpoint

    fast = bench_checkpoint(tmp_path / "pretrained_model", modes=("fast_slow",), iters=3, warmup=1, threads=(1,))
    assert fast[0]["vl_p50"] < 0.5 and fast[0]["sensor_p50"] > 0 and fast[0]["image_size"] >= 28
