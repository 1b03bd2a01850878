"""Figures that read at a glance: constant ground-truth dimensions get no panel, binary ones a fixed scale; the
training curves come from metrics.jsonl (latest value per step, every LR group)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from sensorvla.eval.plots import dimension_kinds, trajectories
from sensorvla.training.run_log import plot_training_curves, read_curves


def fake_samples(episodes: int = 2, steps: int = 12):
    rng = np.random.default_rng(0)
    raws = []
    for e in range(episodes):
        for k in range(steps):
            a = np.zeros((4, 7), np.float32)
            a[:, :3] = rng.normal(size=(4, 3))
            a[:, 6] = float(k < steps // 2)  # a tool flag
            raws.append({"episode_index": e, "timestamp": 0.1 * k, "actions": a, "has_sensor": e == 0})
    pred = np.stack([r["actions"] for r in raws]) + rng.normal(0, 1e-8, size=(len(raws), 4, 7))
    return raws, pred.astype(np.float32)


def test_dimension_kinds_find_constant_and_binary_dimensions():
    raws, _ = fake_samples()
    gt = np.stack([r["actions"] for r in raws])
    assert dimension_kinds(gt) == ["continuous"] * 3 + ["constant"] * 3 + ["binary"]
    gt[0, 0, 3] = 1e-9  # float noise far below the data's scale still counts as constant
    assert dimension_kinds(gt)[3] == "constant"


def test_trajectories_draw_no_panel_for_constant_dimensions(tmp_path):
    raws, pred = fake_samples()
    names = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "tool"]
    trajectories(raws, pred, names, tmp_path / "t.png")
    shown = Image.open(tmp_path / "t.png").size[1]
    for r in raws:  # the same figure with the rotations moving: three more rows
        r["actions"][:, 3:6] = np.random.default_rng(1).normal(size=(4, 3))
    trajectories(raws, pred, names, tmp_path / "all.png")
    assert Image.open(tmp_path / "all.png").size[1] > shown + 3 * 1.5 * 110 * 0.9


def test_training_curves_from_metrics_jsonl(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s, "lr/head": 1e-3, "lr/vl_lora": 1e-4} for s in (1, 2, 3)]
    rows += [{"kind": "val", "step": 3, "val_loss": 0.4}, {"kind": "train", "step": 3, "loss": 0.25}]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"kind": "train", "st'  # a line cut by a killed run
    (tmp_path / "metrics.jsonl").write_text(text)
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert curves["loss"] == {1: 1.0, 2: 0.5, 3: 0.25}  # step 3 logged twice: the latest value
    assert curves["val_loss"] == {3: 0.4} and set(curves) == {"loss", "val_loss", "lr/head", "lr/vl_lora"}
    assert plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png") == tmp_path / "curves.png"
    assert Image.open(tmp_path / "curves.png").size == (1000, 360)
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
