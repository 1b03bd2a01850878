"""Does the data loader keep up with training? Loader samples/s (0 and 2 workers, full transform chain:
memory-mapped streams -> window resampling -> normalization -> chat template + processor -> collate)
next to samples/s of a training step (forward + backward + AdamW) of the tiny model, as one ratio.

Run: `python benchmarks/run.py data`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path


def run(num_workers=(0, 2), batch_size: int = 16, steps: int = 20, root: str | None = None) -> dict:
    import torch

    from sensorvla.config import SensorVLAConfig
    from sensorvla.data.format import load_meta
    from sensorvla.data.normalize import compute_stats
    from sensorvla.data.synth import generate_dataset
    from sensorvla.data.transforms import SampleTransform
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.pretrained import build_policy, resolve_from_meta
    from sensorvla.models.tiny_qwen import build_tiny_qwen_vl
    from sensorvla.training.data_setup import ShardedEpochSampler, build_normalizer, make_loader, raw_dataset

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(root or tempfile.mkdtemp(prefix="bench_data_"))
    vl = build_tiny_qwen_vl(root / "tiny")
    data = generate_dataset(root / "data", num_episodes=24, seed=0, progress=False)
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl)
    cfg.data.dataset_dir = str(data)
    cfg.train.batch_size = batch_size
    cfg = resolve_from_meta(cfg, load_meta(data))
    norm = build_normalizer(compute_stats(data, progress=False), cfg)
    proc = load_processor(str(vl), min_pixels=cfg.model.backbone.min_pixels, max_pixels=cfg.model.backbone.max_pixels)
    tf = SampleTransform(norm, proc, cfg.model.backbone.prompt_template, cfg.model.state_dim)
    ds = raw_dataset(cfg, "train")
    result: dict = {"batch_size": batch_size, "sensor_channels": cfg.model.sensor.channels}
    batches = []
    for w in num_workers:
        cfg.data.num_workers = w
        sampler = ShardedEpochSampler(len(ds), seed=0, rank=0, world=1)
        loader = make_loader(ds, tf, sampler, cfg, pad_token_id(proc))
        it = iter(loader)
        next(it)  # worker start-up is not steady state
        t0 = time.perf_counter()
        n = 0
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
    policy = build_policy(cfg)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    for b in batches[:1]:  # warm-up
        policy(b)[0].backward()
    t0 = time.perf_counter()
    n = 0
    for i in range(steps):
        b = batches[i % len(batches)]
        loss, _ = policy(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += b["actions"].shape[0]
    result["train_step_samples_per_s"] = n / (time.perf_counter() - t0)
    for w in num_workers:
        result[f"ratio_loader_{w}workers_over_train"] = (
            result[f"loader_samples_per_s_{w}workers"] / result["train_step_samples_per_s"]
        )
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
