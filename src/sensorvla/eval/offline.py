"""Offline evaluation on held-out episodes: errors in physical units, and sensor and vision ablations.

Samples go through the runner's own transform chain (the training chain), `predict_chunk`, then
un-normalization. Reported per horizon step and per action dimension, for the first action and for the
integrated chunk (final pose), split by sensor availability. The sensor ablation re-evaluates samples
that have sensor data with the sensor masked as missing and with windows shuffled across samples; the
vision ablation re-evaluates every sample with its views blanked and with the views of a sample of
another episode. A positive delta means the policy uses that modality.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorvla.io import atomic_write_bytes, atomic_write_json
from sensorvla.progress import progress as track

logger = logging.getLogger(__name__)
ABLATIONS = ("missing", "shuffled")
VISION_ABLATIONS = ("blank", "shuffled")


def _predict(
    runner, raws: list[dict], batch_size: int, seed: int, desc: str = "", progress: bool | str = False
) -> np.ndarray:
    """Raw samples -> predicted chunks (N, H, D_a) in physical units."""
    from sensorvla.models.backbone import pad_token_id
    from sensorvla.models.processor import collate

    out = []
    pad = pad_token_id(runner.processor)
    gen = torch.Generator(device=runner.device).manual_seed(seed)
    starts = range(0, len(raws), batch_size)
    for i in track(starts, desc=f"eval {desc}".strip(), unit="batches", mode=progress):
        batch = collate([runner.transform(r) for r in raws[i : i + batch_size]], pad)
        batch = {k: v.to(runner.device) for k, v in batch.items()}
        pred = runner.policy.predict_chunk(batch, generator=gen).float().cpu().numpy()
        out.append(np.asarray(runner.normalizer.unnormalize("actions", pred), np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0, 0), np.float32)


def _errors(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """pred/gt (N, H, D_a), mask (N, H) -> per-step / per-dim L1 and MSE, first-action and final-pose L1."""
    m = mask[..., None].astype(np.float64)
    err = pred - gt
    n_valid = np.maximum(m.sum(0), 1)  # (H, 1)
    l1_step_dim = (np.abs(err) * m).sum(0) / n_valid
    mse_step_dim = (err**2 * m).sum(0) / n_valid
    final = np.abs((pred * m).sum(1) - (gt * m).sum(1))  # integrated chunk = final pose displacement
    return {
        "l1": float((np.abs(err) * m).sum() / max(m.sum() * err.shape[-1], 1)),
        "mse": float((err**2 * m).sum() / max(m.sum() * err.shape[-1], 1)),
        "first_action_l1": float(np.abs(err[:, 0]).mean()) if len(err) else 0.0,
        "final_pose_l1": float(final.mean()) if len(err) else 0.0,
        "l1_per_step": l1_step_dim.mean(1).tolist(),
        "mse_per_step": mse_step_dim.mean(1).tolist(),
        "l1_per_dim": ((np.abs(err) * m).sum((0, 1)) / max(m.sum(), 1)).tolist(),
        "mse_per_dim": ((err**2 * m).sum((0, 1)) / max(m.sum(), 1)).tolist(),
        "l1_per_step_dim": l1_step_dim.tolist(),
        "mse_per_step_dim": mse_step_dim.tolist(),
        "first_action_l1_per_dim": np.abs(err[:, 0]).mean(0).tolist() if len(err) else [],
        "final_pose_l1_per_dim": final.mean(0).tolist() if len(err) else [],
        "num_samples": int(len(err)),
    }


def _ablate(raws: list[dict], mode: str, seed: int) -> list[dict]:
    """The same samples with the sensor of every sample that has one masked ("missing") or swapped with
    another such sample's window ("shuffled", a deterministic derangement for `seed`). Samples without
    sensor data stay as they are, so batches, and so sampling noise, match the normal pass exactly."""
    out = [dict(r) for r in raws]
    idx = [i for i, r in enumerate(raws) if r["has_sensor"]]
    if mode == "missing":
        for i in idx:
            out[i]["sensor"] = np.zeros_like(raws[i]["sensor"])
            out[i]["sensor_mask"] = np.zeros_like(raws[i]["sensor_mask"])
            out[i]["has_sensor"] = False
    elif mode == "shuffled" and len(idx) > 1:
        perm = np.random.default_rng(seed).permutation(len(idx))
        src = np.empty(len(idx), dtype=int)
        src[perm] = np.roll(perm, 1)  # one cycle through a random order: no sample keeps its own window
        for i, j in zip(idx, src):
            out[i]["sensor"], out[i]["sensor_mask"] = raws[idx[j]]["sensor"], raws[idx[j]]["sensor_mask"]
    return out


def _ablate_vision(raws: list[dict], mode: str, seed: int) -> list[dict]:
    """The same samples with black views ("blank") or with the views of the sample at the same relative
    position of another episode ("shuffled": a deterministic derangement of the episodes for `seed`)."""
    out = [dict(r) for r in raws]
    if mode == "blank":
        for r in out:
            r["images"] = [np.zeros_like(im) for im in r["images"]]
        return out
    episodes = sorted({r["episode_index"] for r in raws})
    members = {e: [i for i, r in enumerate(raws) if r["episode_index"] == e] for e in episodes}
    if len(episodes) < 2:
        raise ValueError("the shuffled vision ablation needs samples of at least 2 episodes")
    order = np.random.default_rng(seed).permutation(len(episodes))
    donor = {episodes[order[k]]: episodes[order[(k + 1) % len(order)]] for k in range(len(order))}
    for e, idx in members.items():
        src = members[donor[e]]
        for k, i in enumerate(idx):
            out[i]["images"] = raws[src[min(len(src) - 1, k * len(src) // len(idx))]]["images"]
    return out


def _delta(e: dict[str, Any], base: float) -> dict[str, Any]:
    return {
        "l1": e["l1"],
        "final_pose_l1": e["final_pose_l1"],
        "first_action_l1": e["first_action_l1"],
        "delta_l1": e["l1"] - base,
        "delta_pct": 100.0 * (e["l1"] - base) / max(base, 1e-12),
        "l1_per_dim": e["l1_per_dim"],
    }


def evaluate(
    checkpoint_dir: str | Path,
    dataset_dir: str | Path,
    *,
    split: str = "test",
    out_dir: str | Path = "eval_out",
    batch_size: int = 16,
    max_samples: int | None = None,
    seed: int = 0,
    progress: bool | str = True,
    runner=None,
) -> dict[str, Any]:
    """Evaluate a pretrained_model folder on a dataset split; write metrics.json, plots and a report.

    `max_samples` keeps the first N samples of the split (whole episodes first, in episode order)."""
    from sensorvla.data.dataset import EpisodeDataset
    from sensorvla.eval import plots
    from sensorvla.inference.runner import PolicyRunner

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = runner or PolicyRunner.from_pretrained(checkpoint_dir)
    data_cfg = dataclasses.replace(runner.cfg.data, dataset_dir=str(dataset_dir), mixture=())
    ds = EpisodeDataset(dataset_dir, data_cfg, split=split)
    n = len(ds) if max_samples is None else min(len(ds), max_samples)
    if n == 0:
        raise ValueError(f"split {split!r} of {dataset_dir} has no samples; use --split all or another dataset")
    raws = [ds[i] for i in track(range(n), desc=f"load {split}", unit="samples", mode=progress)]
    gt = np.stack([r["actions"] for r in raws])
    mask = np.stack([r["action_mask"] for r in raws])
    has = np.array([r["has_sensor"] for r in raws])
    pred = _predict(runner, raws, batch_size, seed, "normal", progress)
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "dataset": str(dataset_dir),
        "split": split,
        **_errors(pred, gt, mask),
    }
    metrics["with_sensor"] = _errors(pred[has], gt[has], mask[has])
    metrics["without_sensor"] = _errors(pred[~has], gt[~has], mask[~has])
    names = ds.meta.info["features"]["action"].get("names") or [f"a{i}" for i in range(gt.shape[-1])]
    metrics["action_names"] = names
    ablation = {}
    if has.any():
        base = metrics["with_sensor"]["l1"]
        for mode in ABLATIONS:
            p = _predict(runner, _ablate(raws, mode, seed), batch_size, seed, f"sensor {mode}", progress)[has]
            e = _errors(p, gt[has], mask[has])
            ablation[mode] = _delta(e, base)
            metrics[f"sensor_ablation_delta_l1_{mode}"] = e["l1"] - base
    metrics["ablation"] = ablation
    vision: dict[str, Any] = {}
    for mode in VISION_ABLATIONS:
        if mode == "shuffled" and len({r["episode_index"] for r in raws}) < 2:
            continue
        views = _ablate_vision(raws, mode, seed)
        e = _errors(_predict(runner, views, batch_size, seed, f"views {mode}", progress), gt, mask)
        vision[mode] = _delta(e, metrics["l1"])
        metrics[f"vision_ablation_delta_l1_{mode}"] = e["l1"] - metrics["l1"]
    metrics["vision_ablation"] = vision
    figs = {
        "trajectories": plots.trajectories(raws, pred, names, out_dir / "trajectories.png"),
        "error_per_step": plots.error_per_step(metrics, names, out_dir / "error_per_step.png"),
    }
    if ablation or vision:
        figs["ablation"] = plots.ablation_bars(metrics, out_dir / "sensor_ablation.png")
    metrics["figures"] = {k: str(Path(v).name) for k, v in figs.items()}
    atomic_write_json(out_dir / "metrics.json", metrics)
    write_report(metrics, out_dir)
    logger.info(
        "eval %s: L1 %.4f, first-action L1 %.4f, ablation %s",
        split,
        metrics["l1"],
        metrics["first_action_l1"],
        {k: round(v["delta_l1"], 4) for k, v in ablation.items()},
    )
    return metrics


def _ablation_table(title: str, label: str, base: float, rows: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: a heading and one row per ablation mode against the normal L1 `base`."""
    lines = [
        f"## {title}",
        "",
        "| input | L1 | ΔL1 vs normal | Δ% |",
        "|---|---|---|---|",
        f"| normal | {base:.4g} | 0 | 0 |",
    ]
    for mode, a in rows.items():
        lines.append(f"| {label} {mode} | {a['l1']:.4g} | {a['delta_l1']:+.4g} | {a['delta_pct']:+.1f}% |")
    return lines + [""]


def write_report(metrics: dict[str, Any], out_dir: Path) -> None:
    """report.md and report.html with the headline numbers and the figures."""
    names = metrics["action_names"]
    lines = [
        f"# Offline evaluation — {metrics['split']} split",
        "",
        f"checkpoint `{metrics['checkpoint']}` · dataset `{metrics['dataset']}` · {metrics['num_samples']} samples",
        "",
        "| metric | all | with sensor | without sensor |",
        "|---|---|---|---|",
    ]
    for key in ("l1", "mse", "first_action_l1", "final_pose_l1", "num_samples"):
        lines.append(
            f"| {key} | {metrics[key]:.4g} | {metrics['with_sensor'][key]:.4g} | {metrics['without_sensor'][key]:.4g} |"
        )
    lines += [
        "",
        "Per action dimension (L1, physical units):",
        "",
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(f"{v:.4g}" for v in metrics["l1_per_dim"]) + " |",
        "",
    ]
    if metrics["ablation"]:
        lines += _ablation_table(
            "Sensor ablation (samples with sensor data)", "sensor", metrics["with_sensor"]["l1"], metrics["ablation"]
        )
        lines += ["A positive delta means the policy relies on the sensor.", ""]
    if metrics.get("vision_ablation"):
        lines += _ablation_table("Vision ablation (every sample)", "views", metrics["l1"], metrics["vision_ablation"])
        lines += ["A positive delta means the policy relies on the cameras.", ""]
    for title, fname in metrics["figures"].items():
        lines += [f"## {title.replace('_', ' ')}", "", f"![{title}]({fname})", ""]
    md = "\n".join(lines)
    atomic_write_bytes(out_dir / "report.md", md.encode())
    headline = {k: metrics[k] for k in ("l1", "first_action_l1", "final_pose_l1", "num_samples")}
    html = [
        "<html><head><meta charset='utf-8'><title>sensorvla eval</title></head><body>",
        f"<pre>{json.dumps(headline, indent=1)}</pre>",
    ]
    html += [f"<h2>{t}</h2><img src='{f}' style='max-width:100%'>" for t, f in metrics["figures"].items()]
    if metrics["ablation"]:
        rows = "".join(
            f"<tr><td>{m}</td><td>{a['l1']:.4g}</td><td>{a['delta_l1']:+.4g}</td></tr>"
            for m, a in metrics["ablation"].items()
        )
        html.append(
            f"<h2>Sensor ablation</h2><table border=1><tr><th>input</th><th>L1</th><th>ΔL1</th></tr>{rows}</table>"
        )
    html.append("</body></html>")
    atomic_write_bytes(out_dir / "report.html", "\n".join(html).encode())
