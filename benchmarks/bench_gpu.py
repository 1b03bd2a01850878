"""The GPU benchmark (issue 12 item 6), run by `benchmarks/gpu.sh`; about 4 minutes on one GPU.

On the random real-size Qwen2.5-VL-3B in bf16:
1. stage-1 steps uncached (VL forward every step) and from the VL cache, and a stage-2 LoRA step, at batch 4,
   each with its measured peak (torch.cuda.max_memory_allocated after the first step) beside the planner's;
2. runner latency p50 / p99 for 1 and 3 views, full and fast-slow (the fast-slow loop rate in Hz);
3. the same with `--runtime.compile` on and off, where this build has that flag.
Writes `<out>/gpu_bench.json` and `<out>/gpu_bench.md`. `--dry-run` runs every Python part on CPU with the tiny
model (so the script is known to work before a GPU is lent); without `--dry-run` it refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT_VL = "random:Qwen/Qwen2.5-VL-3B-Instruct"


def _median_step_ms(run_dir: Path, batch: int) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sps = sorted(r["samples_per_s"] for r in rows if r["kind"] == "train" and "samples_per_s" in r)[1:]  # skip step 1
    return 1000.0 * batch / sps[len(sps) // 2] if sps else float("nan")


def _base_cfg(vl: str, data: Path, out: Path, steps: int, device: str):
    from sensorvla.config import SensorVLAConfig

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = vl
    cfg.model.backbone.dtype = "bfloat16"
    cfg.model.backbone.min_pixels = cfg.model.backbone.max_pixels = 224 * 224
    cfg.data.dataset_dir = str(data)
    cfg.data.val_fraction = 0.0
    cfg.train.output_dir = str(out)
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.max_steps, cfg.train.epochs = 4, 1, steps, 1
    cfg.train.tensorboard, cfg.train.log_every_steps, cfg.train.device = False, 1, device
    return cfg


def _has_compile(cfg) -> bool:
    return hasattr(cfg, "runtime") and hasattr(cfg.runtime, "compile")


def training_rows(vl: str, data: Path, root: Path, steps: int, device: str) -> list[dict]:
    """Stage-1 uncached / cached and stage-2 LoRA: step time, measured and planned peak."""
    from sensorvla.plan.measure import measure_step_peak
    from sensorvla.plan.planner import plan
    from sensorvla.training.checkpoint import BEST_NAME
    from sensorvla.training.loop import train

    rows = []

    def run(name: str, cfg, scenario_suffix: str, planner_models: bool = True) -> None:
        t0 = time.perf_counter()
        p = plan(cfg, device=device, gpus=(1,))
        sc = next(s for s in p.scenarios if s.name.endswith(scenario_suffix))
        measured = measure_step_peak(cfg, device)
        rows.append(
            {
                "run": name,
                "batch": cfg.train.batch_size,
                "step_ms": _median_step_ms(Path(cfg.train.output_dir), cfg.train.batch_size),
                "peak_measured_gib": measured / 2**30,
                "peak_planned_gib": sc.per_gpu["ddp"][1] / 2**30,
                "planned_over_measured": sc.per_gpu["ddp"][1] / measured,
                # the planner does not model torch.compile's own allocations (inductor workspaces, and on CPU the
                # compiler's tensors during a recompile), so its ratio is reported but not a check of the planner
                "planner_models": planner_models,
                "wall_s": time.perf_counter() - t0,
            }
        )
        print(f"[gpu-bench] {name}: {rows[-1]}", flush=True)

    s1 = _base_cfg(vl, data, root / "stage1_uncached", steps, device)
    s1.train.use_cache = "never"
    run("stage1 uncached", s1, " uncached")
    cache_train = dataclasses.replace(
        s1.train,
        mode="cache",
        use_cache="auto",
        output_dir=str(root / "stage1_cached"),
        cache_dir=str(root / "vl_cache"),
    )  # one cache folder for every cached run below (the compile on / off runs have their own output dirs)
    cache = dataclasses.replace(s1, train=cache_train)
    t0 = time.perf_counter()
    train(cache, progress=False)
    cache_s = time.perf_counter() - t0
    cached = dataclasses.replace(cache, train=dataclasses.replace(cache.train, mode="train", use_cache="always"))
    run("stage1 cached", cached, " cached")
    rows[-1]["cache_build_s"] = cache_s
    if _has_compile(cached):
        for on in (False, True):
            c = dataclasses.replace(cached, train=dataclasses.replace(cached.train, output_dir=str(root / f"c{on}")))
            c.runtime.compile = on
            run(f"stage1 cached, compile {'on' if on else 'off'}", c, " cached", planner_models=not on)
    s2 = _base_cfg(vl, data, root / "stage2_lora", steps, device)
    s2.train.stage = "stage2"
    s2.model.finetune.mode = "lora"
    s2.train.stage1_checkpoint = str(root / "stage1_uncached" / "checkpoints" / BEST_NAME)
    run("stage2 LoRA", s2, "lora")
    return rows


def latency_rows(vl: str, device: str, iters: int) -> list[dict]:
    """Runner p50/p99 for 1 and 3 views (full and fast-slow), and with compile on/off where available."""
    from sensorvla.eval.latency import bench_latency

    kwargs = dict(heads=("regression",), views=(1, 3), modes=("full", "fast_slow"), iters=iters, device=device)
    rows = []
    if "compile" in inspect.signature(bench_latency).parameters:
        for on in (False, True):
            for r in bench_latency(vl, **kwargs, compile=on):
                rows.append({**r, "compile": on})
    else:
        rows = [{**r, "compile": None} for r in bench_latency(vl, **kwargs)]
    return rows


def markdown(meta: dict, train_rows: list[dict], lat_rows: list[dict]) -> str:
    out = [f"# GPU benchmark ({meta['date']}, {meta['device_name']}, {meta['vl_model']}, bf16)", ""]
    out += [
        "| run | batch | step ms | peak measured GiB | peak planned GiB | planned / measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in train_rows:
        out.append(
            f"| {r['run']} | {r['batch']} | {r['step_ms']:.1f} | {r['peak_measured_gib']:.2f} | "
            f"{r['peak_planned_gib']:.2f} | {r['planned_over_measured']:.3f}{'' if r['planner_models'] else ' *'} |"
        )
    if any(not r["planner_models"] for r in train_rows):
        out += ["", "\\* the planner does not model torch.compile's own allocations; this ratio is not a check."]
    out += ["", "| views | mode | compile | total p50 ms | total p99 ms | loop Hz |", "|---|---|---|---|---|---|"]
    for r in lat_rows:
        comp = "n/a" if r["compile"] is None else ("on" if r["compile"] else "off")
        out.append(
            f"| {r['views']} | {r['mode']} | {comp} | {r['total_p50']:.2f} | {r['total_p99']:.2f} | {r['hz']:.1f} |"
        )
    if lat_rows and lat_rows[0]["compile"] is None:
        out += ["", "compile: this build has no `--runtime.compile` yet (issue 12 item 1); only the eager rows ran."]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/bench_gpu.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_bench"))
    ap.add_argument("--vl-model", default=DEFAULT_VL)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--dry-run", action="store_true", help="CPU + the tiny model: checks the script, not the GPU")
    args = ap.parse_args(argv)

    import torch

    from sensorvla.world.synth import generate_dataset

    if args.dry_run:
        from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

        device, vl = "cpu", str(build_tiny_qwen_vl(args.out / "tiny_vl"))
        args.steps, args.iters = min(args.steps, 3), min(args.iters, 5)
    elif not torch.cuda.is_available():
        print(
            "bench_gpu: CUDA is not available (torch.cuda.is_available() is False); run it on a GPU machine or "
            "pass --dry-run to check it on CPU with the tiny model",
            file=sys.stderr,
        )
        return 2
    else:
        device, vl = "cuda", args.vl_model
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = generate_dataset(args.out / "data224", num_episodes=4, image_size=224, progress=False)
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "vl_model": vl if not args.dry_run else f"{vl} (dry run)",
        "torch": torch.__version__,
    }
    train_rows = training_rows(vl, data, args.out / "runs", args.steps, device)
    lat_rows = latency_rows(vl, device, args.iters)
    meta["wall_s"] = time.perf_counter() - t0
    (args.out / "gpu_bench.json").write_text(
        json.dumps({"meta": meta, "training": train_rows, "latency": lat_rows}, indent=2, default=float)
    )
    md = markdown(meta, train_rows, lat_rows)
    (args.out / "gpu_bench.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.md'} in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
