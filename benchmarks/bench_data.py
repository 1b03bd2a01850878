"""Does the data loader keep up with training, and what does video cost? Three measurements, each a ratio
taken side by side in one run (these machines are noisy):

1. loader: samples/s of the full chain (video decode -> window resampling -> normalization -> chat
   template + processor -> collate) with 0 and 2 workers, against samples/s of a training step (forward
   + backward + AdamW) of the tiny model. The goal is >= 5x with the default workers (`--data.num-workers`
   -1 = auto: `runtime.loader_workers`, 2 on a machine with 2 or more cores per process).
2. decode: camera frames/s decoded by timestamp in random order on one core (one decoder thread,
   OMP_NUM_THREADS=1) for 2 x 224^2 views, against the frames/s a training step consumes at that size.
3. storage: bytes per camera frame, H.264 video vs raw .npy, on the synthetic dataset (64^2 and 224^2).

Run: `OMP_NUM_THREADS=1 python benchmarks/run.py data`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from _scratch import scratch_dir


def _setup(root: Path, image_size: int, episodes: int, vl=None):
    from sensorvla.config import SensorVLAConfig, resolve_from_meta
    from sensorvla.data.format import load_meta
    from sensorvla.world.synth import generate_dataset
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    vl = vl or build_tiny_qwen_vl(root / "tiny")
    data = generate_dataset(
        root / f"data{image_size}", num_episodes=episodes, seed=0, image_size=image_size, progress=False
    )
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl)
    cfg.data.dataset_dir = str(data)
    cfg = resolve_from_meta(cfg, load_meta(data))
    return vl, data, cfg


def _transform(cfg, data):
    from sensorvla.data.normalize import compute_stats
    from sensorvla.models.backbone import load_processor
    from sensorvla.models.processor import PolicyProcessor
    from sensorvla.training.data_setup import build_normalizer

    norm = build_normalizer(compute_stats(data, progress=False, data_cfg=cfg.data), cfg)
    bb = cfg.model.backbone
    proc = load_processor(bb.vl_model, min_pixels=bb.min_pixels, max_pixels=bb.max_pixels)
    return PolicyProcessor(norm, proc, bb.prompt_template, cfg.model.state_dim), proc


def _train_rate(cfg, batches, steps: int) -> float:
    """Samples/s of forward + backward + AdamW on the tiny model, over prepared batches."""
    import torch

    from sensorvla.models.policy import build_policy

    policy = build_policy(cfg)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    policy(batches[0])[0].backward()  # warm-up
    t0, n = time.perf_counter(), 0
    for i in range(steps):
        b = batches[i % len(batches)]
        loss, _ = policy(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += b["actions"].shape[0]
    return n / (time.perf_counter() - t0)


def loader_vs_train(
    root: Path, num_workers=(0, 2), batch_size: int = 16, steps: int = 20, image_size: int = 64, at_size: bool = False
) -> dict:
    """The loader (0 and 2 workers) against a training step's consumption. `at_size`: the processor's pixels
    equal the views' (min = max = image_size^2, as the demo configures it), so the processor does not resize
    and `process_sample` takes its direct path; otherwise the default pixel range (64^2 views are resized)."""
    from sensorvla.models.backbone import pad_token_id
    from sensorvla.runtime import loader_workers
    from sensorvla.training.data_setup import ShardedEpochSampler, make_loader, raw_dataset

    vl, data, cfg = _setup(root, image_size, 24)
    if at_size:
        cfg.model.backbone.min_pixels = cfg.model.backbone.max_pixels = image_size * image_size
    cfg.train.batch_size = batch_size
    tf, proc = _transform(cfg, data)
    ds = raw_dataset(cfg, "train")
    result: dict = {
        "batch_size": batch_size,
        "image_size": image_size,
        "views": len(ds.views),
        "storage": "video (h264)",
    }
    result["processor_pixels"] = "the views' own (direct path)" if at_size else "default range (views resized)"
    n = min(len(ds), steps * batch_size)
    order = ShardedEpochSampler(len(ds), seed=1, rank=0, world=1).indices()[:n]  # the loader's random order
    t0 = time.perf_counter()
    for i in order:  # the data layer alone: decode (random seeks) + alignment + windows, before the processor
        ds[i]
    result["raw_samples_per_s_0workers"] = n / (time.perf_counter() - t0)
    batches = []
    for w in num_workers:
        cfg.data.num_workers = w
        loader = make_loader(ds, tf, ShardedEpochSampler(len(ds), seed=0, rank=0, world=1), cfg, pad_token_id(proc))
        it = iter(loader)
        next(it)  # worker start-up is not steady state
        t0, n = time.perf_counter(), 0
        for _ in range(steps):
            try:
                b = next(it)
            except StopIteration:
                it = iter(loader)
                b = next(it)
            n += b["actions"].shape[0]
            if w == num_workers[0] and len(batches) < 3:
                batches.append(b)
        result[f"loader_samples_per_s_{w}workers"] = n / (time.perf_counter() - t0)
    result["train_step_samples_per_s"] = _train_rate(cfg, batches, steps)
    for w in num_workers:
        result[f"ratio_loader_{w}workers_over_train"] = (
            result[f"loader_samples_per_s_{w}workers"] / result["train_step_samples_per_s"]
        )
    default = loader_workers(-1, in_memory=False)  # what a training run uses without --data.num-workers
    result["default_workers"] = default
    if default in num_workers:
        result["ratio_loader_default_workers_over_train"] = result[f"ratio_loader_{default}workers_over_train"]
    result["ratio_raw_0workers_over_train"] = result["raw_samples_per_s_0workers"] / result["train_step_samples_per_s"]
    return result


def decode_vs_consumption(root: Path, image_size: int = 224, frames: int = 400, steps: int = 6) -> dict:
    """Random-order decode of 2 views at image_size^2 (one decoder thread) vs a training step's consumption."""
    import numpy as np

    from sensorvla.data.dataset import EpisodeDataset
    from sensorvla.models.backbone import pad_token_id
    from sensorvla.models.processor import collate

    vl, data, cfg = _setup(root, image_size, 8)
    ds = EpisodeDataset(data, cfg.data, split="all")
    views = len(ds.views)
    order = np.random.default_rng(0).permutation(len(ds))[: frames // views]
    t0 = time.perf_counter()
    for idx in order:
        e, i = ds.index[int(idx)]
        ep = ds._eps[e]
        for v in ds.views:
            j = int(ds._image_rows(ep, v, ep.t[i]))
            ep.images[v][1][j]
    decode_fps = len(order) * views / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    raws = [ds[int(k)] for k in order[:64]]
    sample_rate = len(raws) / (time.perf_counter() - t0)
    tf, proc = _transform(cfg, data)
    batches = [collate([tf(r) for r in raws[k : k + 8]], pad_token_id(proc)) for k in range(0, 24, 8)]
    train = _train_rate(cfg, batches, steps)
    return {
        "image_size": image_size,
        "views": views,
        "codec": "h264 (yuv420p, keyframe every 2 frames)",
        "decode_frames_per_s_1core": decode_fps,
        "raw_samples_per_s_1core": sample_rate,
        "train_step_frames_per_s": train * views,
        "ratio_decode_over_consumption": decode_fps / (train * views),
    }


def storage(root: Path, sizes=(64, 224), episodes: int = 6) -> dict:
    """Bytes per camera frame: video vs raw .npy, the same synthetic episodes written both ways."""
    from sensorvla.data.format import load_meta, write_dataset
    from sensorvla.world.synth import SimConfig, simulate_episode

    out = {}
    for size in sizes:
        sim = SimConfig(image_size=size)
        eps = [simulate_episode(e, sim, with_sensor=True, name=f"e{e}") for e in range(episodes)]
        row = {}
        for fmt in ("video", "npy"):
            d = write_dataset(
                eps, root / f"{fmt}{size}", dataset_id="s", action_fps=10, progress=False, image_format=fmt
            )
            meta = load_meta(d)
            if fmt == "video":
                files = list((d / "videos").rglob("*.mp4"))
                frames = sum(r["length"] for r in meta.episodes) * len(meta.views)  # held on the 10 Hz grid
            else:
                files = list((d / "streams").rglob("observation.images.*/**/*.values.npy"))
                frames = sum(len(ep.images[v].timestamps) for ep in eps for v in ep.images)  # own 5 Hz
            nbytes = sum(f.stat().st_size for f in files)
            row[f"{fmt}_bytes_per_frame"] = nbytes / frames
            row[f"{fmt}_bytes_per_second_of_recording"] = nbytes / sum(len(ep.actions) * 0.1 for ep in eps)
        row["npy_over_video_per_frame"] = row["npy_bytes_per_frame"] / row["video_bytes_per_frame"]
        row["npy_over_video_per_second"] = (
            row["npy_bytes_per_second_of_recording"] / row["video_bytes_per_second_of_recording"]
        )
        out[f"{size}x{size}"] = row
    return out


def run(root: str | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = Path(root or scratch_dir("bench_data_"))
    return {
        "loader_vs_train": loader_vs_train(base / "loader"),
        "loader_vs_train_at_processor_size": loader_vs_train(base / "loader112", image_size=112, at_size=True),
        "decode_vs_consumption": decode_vs_consumption(base / "decode"),
        "storage": storage(base / "storage"),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
