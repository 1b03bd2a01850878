"""Tests outside the default suite: `-m slow` / `--run-slow` (the full demo, heavy end-to-end runs) and
`-m gpu` (CUDA + bf16 paths); the selection flags themselves, and that CI fails when nothing runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
@pytest.mark.parametrize("head", ["regression", "flow"])
def test_full_demo_meets_the_closed_loop_table(tmp_path, head):
    """Issue 9's table: all modalities >= 90 % success and lateral within tolerance; sensor ablated <= 50 %
    with the lateral alignment unchanged; vision ablated <= 30 %; and at least the CNN reference."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "sensorvla.cli", "demo", "--out", str(tmp_path), "--head", head],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((tmp_path / "demo_summary.json").read_text())
    t = s["closed_loop"]
    assert t["all"]["episodes"] == 20
    assert t["all"]["success_rate"] >= 0.9 and t["all"]["lateral_ok_rate"] >= 0.9
    assert t["sensor_ablated"]["success_rate"] <= 0.5
    assert t["sensor_ablated"]["lateral_ok_rate"] >= t["all"]["lateral_ok_rate"] - 0.1  # vision unaffected
    assert t["vision_ablated"]["success_rate"] <= 0.3 and t["vision_ablated"]["lateral_ok_rate"] <= 0.3
    assert t["all"]["success_rate"] >= t["cnn_reference"]["success_rate"]
    assert s["meets_targets"], s["targets"]
    assert s["eval"]["sensor_ablation_delta_l1_missing"] > 0 and s["eval"]["vision_ablation_delta_l1_blank"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| ours, all modalities |" in report
    # issue 23: three rollout videos (a success, a failure, the sensor ablated), curves, a log without `\r`
    videos = re.findall(r"\]\((rollout/[^)]+\.mp4)\)", report)
    assert len(videos) == 3 and all((tmp_path / v).stat().st_size > 0 for v in videos), videos
    assert any("_success" in v for v in videos) and any("_blind_" in v for v in videos)
    assert sum("_failure" in v for v in videos) >= 1
    assert "](stage1/training_curves.png)" in report and "](stage2/training_curves.png)" in report
    assert "\r" not in r.stdout + r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training_and_inference(tmp_path, tiny_vl_dir, synth_dataset_dir):
    from sensorvla.config import SensorVLAConfig
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.training.loop import train

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.model.finetune.mode = "lora"
    cfg.train.stage, cfg.train.stage1_checkpoint, cfg.train.resume = "stage1", None, False
    cfg.data.dataset_dir = str(synth_dataset_dir)
    cfg.train.output_dir = str(tmp_path)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum_steps = 4, 8, 1
    cfg.train.tensorboard = False
    torch.cuda.reset_peak_memory_stats()
    out = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(out["train_loss"])))
    runner = PolicyRunner.from_pretrained(tmp_path / "checkpoints" / "pretrained_model", device="cuda")
    assert next(runner.policy.backbone.model.parameters()).dtype == torch.bfloat16
    assert torch.cuda.max_memory_allocated() > 0


ROOT = Path(__file__).resolve().parents[1]


def collect(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_marked.py"]
    return subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_run_slow_is_a_real_flag_and_m_slow_still_works():
    default = collect()
    assert default.returncode == 0 and "test_full_demo" not in default.stdout and "test_run_slow" in default.stdout
    widened = collect("--run-slow")
    assert widened.returncode == 0 and "test_full_demo" in widened.stdout
    assert "test_cuda_bf16" not in widened.stdout  # gpu tests still need -m gpu
    only = collect("-m", "slow")
    assert only.returncode == 0 and "test_full_demo" in only.stdout and "test_cuda_bf16" not in only.stdout


def test_ci_fails_when_pytest_selects_nothing():
    """.ci/run runs under `set -e`, so pytest's exit 5 (no tests collected) fails CI instead of passing."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci.splitlines()[:5]
    pytest_lines = [line for line in ci.splitlines() if "pytest" in line and not line.startswith("#")]
    assert pytest_lines and not any("|| true" in line or "; true" in line for line in pytest_lines)
    pytest = f"{sys.executable} -m pytest -q -p no:cacheprovider tests/test_marked.py -m nothing_has_this_marker"
    script = f"set -euo pipefail; cd {ROOT}; {pytest}; echo REACHED"
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 5 and "REACHED" not in r.stdout
