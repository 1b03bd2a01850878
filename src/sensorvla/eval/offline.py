"""Offline evaluation on held-out episodes: errors in physical units, and sensor and vision ablations.

Samples go through the runner's own transform chain (the training chain), `predict_chunk`, then
un-normalization. A checkpoint with the wrench output is also scored on the force channels at the chunk's times
(`metrics["wrench"]`, L1 in the sensor's units: newtons for a force sensor). Reported per horizon step and per
action dimension, for the first action and for the integrated chunk (final pose), split by sensor availability.
The sensor ablation re-evaluates samples that have sensor data with the sensor masked as missing and with windows
shuffled across samples; the vision ablation re-evaluates every sample with its views blanked and with the views
of a sample of another episode. A positive delta means the policy uses that modality.

Memory: the split is streamed batch by batch. A first pass without images reads what the metrics, the plots
and the ablation plans need (actions, masks, sensor availability, episode, time); then each batch is decoded
once and predicted under every input variant, and only the predictions are kept. Decoded images never
accumulate (a 20k-sample split of two 640x480 views would be ~37 GB).
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


def _predict_batch(runner, raws: list[dict], gen: torch.Generator, wrench: bool = False) -> dict[str, np.ndarray]:
    """One batch of raw samples -> {"actions": predicted chunks (B, H, D_a)} in physical units, and with `wrench` (a
    policy with the wrench output) {"wrench": (B, H, C_f)} in the sensor's units; the same noise draws either way."""
    from sensorvla.models.backbone import pad_token_id
    from sensorvla.models.processor import collate

    batch = collate([runner.transform(r) for r in raws], pad_token_id(runner.processor))
    batch = {k: v.to(runner.device) for k, v in batch.items()}
    if wrench:
        out = runner.policy.predict(batch, generator=gen)
    else:
        out = {"actions": runner.policy.predict_chunk(batch, generator=gen)}
    return {
        key: np.asarray(runner.normalizer.unnormalize(key, v.float().cpu().numpy()), np.float32)
        for key, v in out.items()
    }


def wrench_errors(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """The wrench output's errors in the sensor's physical units (newtons for a force sensor): pred/gt (N, H, C_f),
    mask (N, H) True where the target is measured -> L1 and its per-step / per-channel means, measured steps."""
    m = mask[..., None].astype(np.float64)
    err = np.abs(pred.astype(np.float64) - gt) * m
    steps = max(float(m.sum()), 1.0)
    return {
        "l1": float(err.sum() / (steps * err.shape[-1])),
        "l1_per_step": (err.sum((0, 2)) / np.maximum(m.sum((0, 2)) * err.shape[-1], 1)).tolist(),
        "l1_per_channel": (err.sum((0, 1)) / steps).tolist(),
        "num_steps": int(m.sum()),
    }


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


def sensor_donors(has_sensor: np.ndarray, seed: int) -> dict[int, int]:
    """The "shuffled" sensor ablation's plan: sample i (with sensor data) -> the sample whose window it gets; one
    cycle through a random order for `seed`, so no sample keeps its own window. Samples without sensor data
    stay as they are, so batches, and so sampling noise, match the normal pass exactly."""
    idx = np.flatnonzero(has_sensor)
    if len(idx) < 2:
        return {}
    perm = np.random.default_rng(seed).permutation(len(idx))
    src = np.empty(len(idx), dtype=int)
    src[perm] = np.roll(perm, 1)
    return {int(i): int(idx[j]) for i, j in zip(idx, src)}


def view_donors(episode_index: np.ndarray, seed: int) -> dict[int, int]:
    """The "shuffled" vision ablation's plan: sample i -> the sample at the same relative position of another
    episode (a deterministic derangement of the episodes for `seed`), whose views it gets."""
    episodes = sorted(set(episode_index.tolist()))
    if len(episodes) < 2:
        raise ValueError("the shuffled vision ablation needs samples of at least 2 episodes")
    members = {e: np.flatnonzero(episode_index == e).tolist() for e in episodes}
    order = np.random.default_rng(seed).permutation(len(episodes))
    donor = {episodes[order[k]]: episodes[order[(k + 1) % len(order)]] for k in range(len(order))}
    out = {}
    for e, idx in members.items():
        src = members[donor[e]]
        for k, i in enumerate(idx):
            out[i] = src[min(len(src) - 1, k * len(src) // len(idx))]
    return out


def _sensor_missing(raw: dict, stream: str | None = None) -> dict:
    """The sample with every sensor window (or the declared stream `stream`'s) masked as missing."""
    out = dict(raw)
    for key in [k for k in raw if k.startswith("sensor.") and stream in (None, k[7:])]:
        out[key], out["sensor_mask." + key[7:]] = np.zeros_like(raw[key]), np.zeros_like(raw["sensor_mask." + key[7:]])
    if stream is None and raw["has_sensor"]:
        out.update(sensor=np.zeros_like(raw["sensor"]), sensor_mask=np.zeros_like(raw["sensor_mask"]), has_sensor=False)
    return out


def _stream_ablation(names, preds, gt, mask, base: float) -> dict[str, Any]:
    """Each declared stream masked on its own (the "<name> missing" passes), over every sample, against `base`."""
    return {n: _delta(_errors(preds[f"{n} missing"], gt, mask), base) for n in names}


def _blank_views(raw: dict) -> dict:
    """The sample with black views."""
    return {**raw, "images": [np.zeros_like(im) for im in raw["images"]]}


def _delta(e: dict[str, Any], base: float) -> dict[str, Any]:
    return {
        "l1": e["l1"],
        "final_pose_l1": e["final_pose_l1"],
        "first_action_l1": e["first_action_l1"],
        "delta_l1": e["l1"] - base,
        "delta_pct": 100.0 * (e["l1"] - base) / max(base, 1e-12),
        "l1_per_dim": e["l1_per_dim"],
    }


def _records(light, n: int, desc: str, progress: bool | str) -> list[dict]:
    """What the metrics, the plots and the ablation plans need of the first `n` samples, read from a dataset that
    decodes no image: episode, time, actions, action mask, sensor availability."""
    keep = ("episode_index", "timestamp", "actions", "action_mask", "has_sensor", "wrench_target", "wrench_target_mask")
    samples = (light[i] for i in track(range(n), desc=desc, unit="samples", mode=progress))
    return [{k: r[k] for k in keep if k in r} for r in samples]


def _passes(has: np.ndarray, episodes: np.ndarray, seed: int, ds, light) -> dict[str, Any]:
    """The input variants every batch is predicted under: name -> (sample index, decoded sample) -> its input.
    The shuffled variants read their donor's window (no image decoded) or views (decoded) on demand."""
    passes: dict[str, Any] = {"normal": lambda i, raw: raw}
    if has.any():
        passes["sensor missing"] = lambda i, raw: _sensor_missing(raw)
        donors = sensor_donors(has, seed)

        def shuffled_sensor(i: int, raw: dict) -> dict:
            if i not in donors:
                return raw
            src = light[donors[i]]
            return {**raw, "sensor": src["sensor"], "sensor_mask": src["sensor_mask"]}

        passes["sensor shuffled"] = shuffled_sensor
    for name in getattr(ds, "stream_names", ()):  # each declared stream ablated on its own
        passes[f"{name} missing"] = lambda i, raw, name=name: _sensor_missing(raw, name)
    passes["views blank"] = lambda i, raw: _blank_views(raw)
    if len(set(episodes.tolist())) >= 2:
        view_src = view_donors(episodes, seed)
        passes["views shuffled"] = lambda i, raw: {**raw, "images": ds[view_src[i]]["images"]}
    return passes


def _stream_predictions(
    runner, ds, n: int, passes: dict[str, Any], batch_size: int, seed: int, progress: bool | str, wrench: bool = False
):
    """Every pass's predictions (N, H, D_a), physical units, and with `wrench` the normal pass's wrench (N, H, C_f)
    as "wrench". Each batch is decoded once and dropped after its passes; each pass draws its sampling noise from
    its own generator, batch after batch, as a pass of its own would."""
    gens = {name: torch.Generator(device=runner.device).manual_seed(seed) for name in passes}
    out: dict[str, list[np.ndarray]] = {name: [] for name in [*passes, *(["wrench"] if wrench else [])]}
    for start in track(range(0, n, batch_size), desc="eval", unit="batches", mode=progress):
        idx = range(start, min(n, start + batch_size))
        raws = [ds[i] for i in idx]
        for name, variant in passes.items():
            got = _predict_batch(
                runner, [variant(i, r) for i, r in zip(idx, raws)], gens[name], wrench=wrench and name == "normal"
            )
            out[name].append(got["actions"])
            if "wrench" in got:
                out["wrench"].append(got["wrench"])
        del raws
    return {name: np.concatenate(chunks) for name, chunks in out.items()}


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
    light = EpisodeDataset(dataset_dir, data_cfg, split=split, load_images=False)  # the same samples, no images
    n = len(ds) if max_samples is None else min(len(ds), max_samples)
    if n == 0:
        raise ValueError(f"split {split!r} of {dataset_dir} has no samples; use --split all or another dataset")
    records = _records(light, n, f"read {split}", progress)
    gt = np.stack([r["actions"] for r in records])
    mask = np.stack([r["action_mask"] for r in records])
    has = np.array([r["has_sensor"] for r in records], dtype=bool)
    episodes = np.array([r["episode_index"] for r in records])
    passes = _passes(has, episodes, seed, ds, light)
    wrench = getattr(runner.policy, "wrench_head", None) is not None and "wrench_target" in records[0]
    preds = _stream_predictions(runner, ds, n, passes, batch_size, seed, progress, wrench=wrench)
    pred = preds["normal"]
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "dataset": str(dataset_dir),
        "split": split,
        **_errors(pred, gt, mask),
    }
    if wrench:  # the wrench output against the force channels at the chunk's times (physical units)
        metrics["wrench"] = wrench_errors(
            preds["wrench"],
            np.stack([r["wrench_target"] for r in records]),
            np.stack([r["wrench_target_mask"] for r in records]),
        )
        metrics["wrench_l1"] = metrics["wrench"]["l1"]
    metrics["with_sensor"] = _errors(pred[has], gt[has], mask[has])
    metrics["without_sensor"] = _errors(pred[~has], gt[~has], mask[~has])
    names = ds.meta.info["features"]["action"].get("names") or [f"a{i}" for i in range(gt.shape[-1])]
    metrics["action_names"] = names
    _add_ablations(metrics, preds, gt, mask, has, ds.stream_names)
    ablation, vision = metrics["ablation"], metrics["vision_ablation"]
    figs = {
        "trajectories": plots.trajectories(records, pred, names, out_dir / "trajectories.png"),
        "error_per_step": plots.error_per_step(metrics, names, out_dir / "error_per_step.png"),
    }
    if ablation or vision:
        figs["ablation"] = plots.ablation_bars(metrics, out_dir / "sensor_ablation.png")
    metrics["figures"] = {k: str(Path(v).name) for k, v in figs.items()}
    atomic_write_json(out_dir / "metrics.json", metrics)
    write_report(metrics, out_dir)
    logger.info(
        "eval %s: L1 %.4f, first-action L1 %.4f, ablation %s%s",
        split,
        metrics["l1"],
        metrics["first_action_l1"],
        {k: round(v["delta_l1"], 4) for k, v in ablation.items()},
        f", wrench L1 {metrics['wrench']['l1']:.4g} (sensor units)" if "wrench" in metrics else "",
    )
    return metrics


def _add_ablations(metrics: dict[str, Any], preds: dict[str, np.ndarray], gt, mask, has, streams=()) -> None:
    """The sensor ablations (samples with sensor data), each declared stream's (every sample) and the vision ablations
    (every sample) into `metrics`: `ablation`, `stream_ablation`, `vision_ablation` and their `*_delta_l1_<mode>`
    headline numbers."""
    ablation = {}
    if has.any():
        base = metrics["with_sensor"]["l1"]
        for mode in ABLATIONS:
            e = _errors(preds[f"sensor {mode}"][has], gt[has], mask[has])
            ablation[mode] = _delta(e, base)
            metrics[f"sensor_ablation_delta_l1_{mode}"] = e["l1"] - base
    metrics["ablation"] = ablation
    metrics["stream_ablation"] = _stream_ablation(streams, preds, gt, mask, metrics["l1"])
    vision: dict[str, Any] = {}
    for mode in VISION_ABLATIONS:
        if f"views {mode}" not in preds:
            continue
        e = _errors(preds[f"views {mode}"], gt, mask)
        vision[mode] = _delta(e, metrics["l1"])
        metrics[f"vision_ablation_delta_l1_{mode}"] = e["l1"] - metrics["l1"]
    metrics["vision_ablation"] = vision


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
    if "wrench" in metrics:
        w = metrics["wrench"]
        lines.append(f"| wrench_l1 (force, sensor units) | {w['l1']:.4g} | | ({w['num_steps']} measured steps) |")
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
    if "wrench" in metrics:
        headline["wrench_l1"] = metrics["wrench"]["l1"]
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
