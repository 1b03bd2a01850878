"""benchmarks/gpu.sh: refuses to run without CUDA, and its Python parts run end to end on CPU (--dry-run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# a hang guard only, never a performance limit: a loaded machine may take many times the usual time
HANG_GUARD_S = 3600

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_sh_fails_clearly_without_cuda(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=_env(), capture_output=True, text=True)
    assert res.returncode == 2
    assert "no CUDA device" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_sh_dry_run_writes_json_and_table(tmp_path):
    out = tmp_path / "dry"
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)], env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((out / "gpu_bench.json").read_text())
    runs = [r["run"] for r in data["training"]]
    assert runs[0] == "stage1 uncached" and "stage1 cached" in runs and runs[-1] == "stage2 LoRA"
    for r in data["training"]:
        assert r["peak_measured_gib"] > 0, r
        # compile-on rows carry the compiler's allocations (a recompile on CPU, e.g.), which the planner does not model
        assert r["planner_models"] == ("compile on" not in r["run"]), r
        if r["planner_models"]:
            assert 0.5 < r["planned_over_measured"] < 2, r
    lat = {(r["views"], r["mode"]) for r in data["latency"]}
    assert lat == {(1, "full"), (1, "fast_slow"), (3, "full"), (3, "fast_slow")}
    table = (out / "gpu_bench.md").read_text()
    assert "| stage2 LoRA | 4 |" in table and "loop Hz" in table
