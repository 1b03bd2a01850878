"""Training benchmarks, measured side by side in one run and reported as ratios.

1. stage-1 step samples/s and CPU-seconds per sample: VL features from the cache vs through the frozen backbone
   (P1), on the backbones of `sensorvla.eval.latency.BACKBONES` (224x224 views): the goals' VL-dominant one at 1
   and 2 torch threads, and the wide one (at the process's thread setting) for reference;
2. samples/s of 1 vs 2 processes (torchrun, gloo on CPU / NCCL on GPU);
3. peak memory of stage 1 vs stage 2 (LoRA) on the same model (peak RSS on CPU, max allocated on CUDA).

Run: `python benchmarks/run.py train` (see README for the latest figures).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from _scratch import scratch_dir

PIXELS = {"min_pixels": 224 * 224, "max_pixels": 224 * 224}


def _setup(root: Path, episodes: int = 4, backbone: str = "wide"):
    from sensorvla.eval.latency import BACKBONES
    from sensorvla.world.synth import generate_dataset
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    vl = build_tiny_qwen_vl(root / f"{backbone}_vl", **BACKBONES[backbone], **PIXELS)
    data = root / "data224"
    if not data.exists():
        data = generate_dataset(data, num_episodes=episodes, seed=0, image_size=224, progress=False)
    return vl, data


def _cfg(vl, data, out, **train_kw):
    from sensorvla.config import SensorVLAConfig

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl)
    cfg.model.backbone.min_pixels = cfg.model.backbone.max_pixels = 224 * 224
    cfg.data.dataset_dir = str(data)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.epochs = 8, 1, 1
    cfg.train.tensorboard = False
    cfg.train.log_every_steps = 1
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def _step_times(run_dir: Path, key: str = "samples_per_s") -> list[float]:
    """Every logged training step's `key` (samples/s by default; `cpu_s_per_sample`: the step's CPU-seconds)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["kind"] == "train" and key in r]


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def cache_vs_backbone(root: Path, vl, data, steps: int = 12, threads: int | None = None) -> dict:
    """P1: stage-1 steps with the VL features from the cache vs through the frozen backbone, side by side.

    Reports each path's median step in samples/s and in CPU-seconds per sample (the loop's `cpu_s_per_sample`:
    the process's every thread; the backbone path's DataLoader worker processes, which decode and resize the
    images, are not in it: ~0.002 CPU-s per sample at 224x224, ~1 % of that path's), their ratios, and the torch
    thread count they ran with (`threads`: set for the call, else the process's setting). The wall times of the
    whole `train()` calls also hold set-up, validation, checkpoints and the training-curves figure.
    """
    import torch

    from sensorvla.runtime import loader_workers
    from sensorvla.training.loop import train

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        plain = _cfg(vl, data, root / "plain", max_steps=steps, use_cache="never")
        t0 = time.perf_counter()
        train(plain, progress=False)
        t_plain = time.perf_counter() - t0
        cached = _cfg(vl, data, root / "cached", max_steps=steps, use_cache="always")
        build = copy.deepcopy(cached)
        build.train.mode = "cache"
        t0 = time.perf_counter()
        train(build, progress=False)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        train(cached, progress=False)
        t_cached = time.perf_counter() - t0
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    sps_plain, sps_cached = _median(_step_times(root / "plain")), _median(_step_times(root / "cached"))
    cpu_plain = _median(_step_times(root / "plain", "cpu_s_per_sample"))
    cpu_cached = _median(_step_times(root / "cached", "cpu_s_per_sample"))
    return {
        "torch_threads": used,
        "backbone_loader_workers": loader_workers(plain.data.num_workers, in_memory=False),
        "stage1_samples_per_s_backbone": sps_plain,
        "stage1_samples_per_s_cache": sps_cached,
        "speedup_cache_vs_backbone": sps_cached / sps_plain,
        "stage1_cpu_s_per_sample_backbone": cpu_plain,
        "stage1_cpu_s_per_sample_cache": cpu_cached,
        "cpu_ratio_backbone_vs_cache": cpu_plain / cpu_cached,
        "wall_backbone_s": t_plain,
        "wall_cache_build_s": t_build,
        "wall_cached_s": t_cached,
    }


def _torchrun(cfg_path: Path, nproc: int, extra: str = "") -> float:
    code = (
        "import sys,resource,json,torch; from sensorvla.config import SensorVLAConfig;"
        "from sensorvla.training.loop import train; train(SensorVLAConfig.load(sys.argv[1]), progress=False);"
        "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024;"
        "print('PEAK', peak)"
    )
    script = cfg_path.with_suffix(".py")
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
            str(cfg_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    # every rank prints one "PEAK <bytes>"; two ranks' lines can interleave on the shared stdout
    return max(float(v) for v in re.findall(r"PEAK (\d+(?:\.\d+)?)", r.stdout))


def processes(root: Path, vl, data, steps: int = 10) -> dict:
    out = {}
    for n in (1, 2):
        cfg = _cfg(vl, data, root / f"p{n}", max_steps=steps, use_cache="never")
        cfg.train.batch_size = 8 // n  # same global batch
        path = root / f"p{n}.json"
        path.write_text(cfg.to_json())
        _torchrun(path, n)
        out[f"samples_per_s_{n}proc"] = _median(_step_times(root / f"p{n}")[2:])
    out["speedup_2_vs_1"] = out["samples_per_s_2proc"] / out["samples_per_s_1proc"]
    return out


def memory(root: Path, vl, data, steps: int = 4) -> dict:
    from sensorvla.training.checkpoint import BEST_NAME

    s1 = _cfg(vl, data, root / "m1", max_steps=steps, use_cache="never")
    (root / "m1.json").write_text(s1.to_json())
    peak1 = _torchrun(root / "m1.json", 1)
    s2 = _cfg(vl, data, root / "m2", max_steps=steps)
    s2.train.stage, s2.model.finetune.mode = "stage2", "lora"
    s2.train.stage1_checkpoint = str(root / "m1" / "checkpoints" / BEST_NAME)
    (root / "m2.json").write_text(s2.to_json())
    peak2 = _torchrun(root / "m2.json", 1)
    return {"peak_bytes_stage1": peak1, "peak_bytes_stage2_lora": peak2, "ratio_stage2_vs_stage1": peak2 / peak1}


def run(root: str | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(root or scratch_dir("bench_train_"))
    result = {}
    vl, data = _setup(root, backbone="vl_dominant")
    for threads in (1, 2):  # P1 at 1 and 2 torch threads side by side (the thread count is in each result)
        result[f"cache_vl_dominant_{threads}thread"] = cache_vs_backbone(
            root / f"vl_dominant_{threads}", vl, data, threads=threads
        )
    vl, data = _setup(root, backbone="wide")
    result["cache_wide"] = cache_vs_backbone(root / "wide", vl, data)
    result["processes"] = processes(root, vl, data)
    result["memory"] = memory(root, vl, data)
    return result


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
