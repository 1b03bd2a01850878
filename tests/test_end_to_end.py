"""The README's main job, end to end through the installed CLI: `sensorvla demo` (quick settings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

from sensorvla.data.video import probe

# a hang guard only, never a performance limit: a loaded machine may take many times the usual time
HANG_GUARD_S = 3600


def test_demo_quick_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "sensorvla.cli", "demo", "--out", str(tmp_path), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    # the smoke step printed each head's loss and the parameter table
    for head in ("regression", "diffusion", "flow"):
        assert f"[smoke] head={head}" in r.stdout
    assert "trainable" in r.stdout and "sensor_encoder" in r.stdout
    # stage 1 from the cache, then stage 2 (the vision tower trained) from the stage-1 checkpoint
    s1 = torch.load(tmp_path / "stage1" / "checkpoints" / "qwen_vla_sensor_best.pt", weights_only=True)
    s2 = torch.load(tmp_path / "stage2" / "checkpoints" / "qwen_vla_sensor_best.pt", weights_only=True)
    assert s1["training_stage"] == "stage1" and s2["training_stage"] == "stage2"
    assert any(p.name.endswith(".feats.bin") for p in (tmp_path / "stage1" / "vl_cache").rglob("*"))
    # the demo's features are the embeddings (feature layer 0): no language-model layer reaches them, so no LoRA;
    # the trained vision tower is in the stage-2 file
    assert not (tmp_path / "stage2" / "checkpoints" / "pretrained_model" / "adapter_model.safetensors").exists()
    assert any(k.startswith("backbone.model.visual.") for k in s2["model_state_dict"])
    # every phase is timed, and the phases add up to (nearly) the whole run
    phases = {k: v for k, v in summary["wall_s"].items() if k != "total"}
    assert set(phases) == {"data", "smoke", "cache", "stage1", "stage2", "cnn_rollouts", "eval", "closed_loop"}
    assert all(v >= 0 for v in phases.values()) and 0.9 * summary["wall_s_total"] <= sum(phases.values())
    assert f"[demo] done in {summary['wall_s_total']:.0f}s (data " in r.stdout
    # the policy uses the sensor: masking it makes held-out errors worse, and closed-loop success drops
    assert summary["eval"]["sensor_ablation_delta_l1_missing"] > 0
    assert summary["eval"]["sensor_ablation_delta_l1_shuffled"] > 0
    assert summary["rollout_success"] >= summary["rollout_success_sensor_ablated"]
    # the policy uses the cameras too: blanking or swapping the views makes held-out errors worse
    assert summary["eval"]["vision_ablation_delta_l1_blank"] > 0
    assert summary["eval"]["vision_ablation_delta_l1_shuffled"] > 0
    # the table's rows, with the scripted references that bound them: the task needs both senses
    table = summary["closed_loop"]
    assert set(table) == {"all", "sensor_ablated", "vision_ablated", "expert", "expert_sensor_blind",
                          "expert_vision_blind"}  # fmt: skip
    assert table["expert"]["success_rate"] == 1.0 and table["expert"]["lateral_ok_rate"] == 1.0
    assert table["expert_sensor_blind"]["success_rate"] < 1.0 and table["expert_sensor_blind"]["lateral_ok_rate"] == 1.0
    assert table["expert_vision_blind"]["success_rate"] < 0.5
    assert all(row["episodes"] == 6 for name, row in table.items() if not name.startswith("expert"))
    assert set(summary["targets"]) >= {"all.success_rate >= 0.9", "vision_ablated.success_rate <= 0.3"}
    report = (tmp_path / "report.md").read_text()
    assert "| ours, all modalities |" in report and "| scripted expert, no cameras |" in report
    for name in ("metrics.json", "report.md", "sensor_ablation.png", "trajectories.png"):
        assert (tmp_path / "eval" / name).exists()
    # what a user opens: rollout videos (a success if any, a failure, the sensor ablated), curves, eval figures
    links = re.findall(r"\]\((rollout/[^)]+\.mp4)\)", report)
    assert len(links) >= 2 and any("_blind_" in name for name in links), report
    if table["all"]["success_rate"] > 0:
        assert any("_sensor_success" in name for name in links)
    for name in links:
        assert probe(tmp_path / name).frames > 1
    for stage in ("stage1", "stage2"):
        assert f"]({stage}/training_curves.png)" in report and (tmp_path / stage / "training_curves.png").exists()
        assert (tmp_path / stage / "train_config.json").exists()
    assert "](eval/trajectories.png)" in report
    # a redirected run (the pipes here are not terminals) has no progress-bar frames
    assert "\r" not in r.stdout + r.stderr
