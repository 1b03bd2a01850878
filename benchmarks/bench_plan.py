"""Memory-planner benchmarks: `python benchmarks/run.py plan`.

1. calibration: planned vs measured step peak on this CPU (`plan/measure.py`, the configs of
   tests/plan/calibration.py) for the tiny model and a mid-size (141 M parameter) random model, fp32 and bf16,
   stage 1 uncached / cached, stage 2 LoRA, full fine-tuning;
2. the seed's 4-GPU recipe on the real-size Qwen2.5-VL-3B (random weights, meta device): stage 1 uncached and
   cached, stage 2 LoRA, batch 4 x accumulation 8, with and without activation checkpointing, for two inputs:
   1 view at 224 x 224 and the seed's 5 views at 640 x 360 (230,400 pixels, 264 tokens each).
The tables in docs/scaling.md are this command's output.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

MID = {"text_hidden": 1024, "text_layers": 12, "vision_hidden": 512, "vision_depth": 8}
MODELS = ("tiny", "mid")
CALIBRATION = [
    ("tiny", "float32", "none"),
    ("tiny", "float32", "cached"),
    ("tiny", "float32", "lora"),
    ("tiny", "float32", "full"),
    ("tiny", "bfloat16", "none"),
    ("tiny", "bfloat16", "lora"),
    ("tiny", "float32", "lora+ckpt"),
    ("mid", "float32", "none"),
    ("mid", "float32", "lora"),
    ("mid", "bfloat16", "none"),
    ("mid", "bfloat16", "lora"),
]


def _calibration_module():
    """tests/plan/calibration.py: the calibration configs the test suite checks the planner with."""
    spec = importlib.util.spec_from_file_location("calibration", HERE.parent / "tests" / "plan" / "calibration.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def calibration(root: Path) -> list[dict]:
    from sensorvla.world.synth import generate_dataset
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    # the mid model trains on every episode (no validation split): its own copy of the data, whose norm stats
    # are those of that split (stats of another split are refused as stale)
    data = {n: generate_dataset(root / f"d224_{n}", num_episodes=3, image_size=224, progress=False) for n in MODELS}
    models = {"tiny": build_tiny_qwen_vl(root / "tiny"), "mid": build_tiny_qwen_vl(root / "mid", **MID)}
    calib = _calibration_module()
    rows = []
    for i, (name, dtype, scenario) in enumerate(CALIBRATION):
        extra = {"batch_size": 2, "max_steps": 2} if name == "mid" else {}
        cfg = calib.calibration_config(models[name], data[name], root / f"run{i}", scenario, dtype, **extra)
        if name == "mid":
            cfg.data.views, cfg.data.val_fraction = ("front",), 0.0
        t0 = time.perf_counter()
        planned, measured = calib.planned_and_measured(cfg, scenario, "cpu")
        rows.append(
            {
                "model": name,
                "dtype": dtype,
                "scenario": scenario,
                "planned_mib": planned / 2**20,
                "measured_mib": measured / 2**20,
                "error": planned / measured - 1,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"[plan] {rows[-1]}", flush=True)
    return rows


def recipe() -> list[dict]:
    from sensorvla.config import SensorVLAConfig
    from sensorvla.plan.planner import plan

    rows = []
    inputs = {
        "1 view 224x224": dict(views=1, image_size=(224, 224), pixels=None),
        "5 views 640x360": dict(views=5, image_size=(360, 640), pixels=230400),
    }
    for label, inp in inputs.items():
        for stage in ("stage1", "stage2"):
            for ckpt in (False, True):
                cfg = SensorVLAConfig()
                cfg.model.backbone.vl_model = "random:Qwen/Qwen2.5-VL-3B-Instruct"
                cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.stage = 4, 8, stage
                cfg.model.finetune.mode = "lora" if stage == "stage2" else "none"
                cfg.model.backbone.activation_checkpointing = ckpt
                if inp["pixels"]:
                    cfg.model.backbone.min_pixels = cfg.model.backbone.max_pixels = inp["pixels"]
                p = plan(
                    cfg,
                    device="cuda",
                    gpus=(1, 4),
                    views=inp["views"],
                    image_size=inp["image_size"],
                    sensor_channels=1026,
                )
                for sc in p.scenarios:
                    if ckpt and sc.name.endswith(" cached"):
                        continue  # no VL forward: checkpointing changes nothing
                    rows.append(
                        {
                            "input": label,
                            "tokens": p.shapes.seq_len,
                            "scenario": sc.name,
                            "checkpointing": ckpt and not sc.name.endswith(" cached"),
                            "activations_gib": (sc.act_peak_on if ckpt else sc.act_peak_off) / 2**30,
                            "ddp1_gib": sc.per_gpu["ddp"][1] / 2**30,
                            "ddp4_gib": sc.per_gpu["ddp"][4] / 2**30,
                            "fsdp4_gib": sc.per_gpu["fsdp"][4] / 2**30,
                            "cache_gib_15k": (p.cache_bytes or 0) / 2**30 if sc.name.endswith(" cached") else None,
                        }
                    )
    return rows


def tables(cal: list[dict], rec: list[dict]) -> str:
    out = ["| model | dtype | scenario | planned MiB | measured MiB | error |", "|---|---|---|---|---|---|"]
    for r in cal:
        out.append(
            f"| {r['model']} | {r['dtype']} | {r['scenario']} | {r['planned_mib']:.1f} | {r['measured_mib']:.1f} | "
            f"{r['error']:+.1%} |"
        )
    out += [
        "",
        "| input | tokens/sample | scenario | checkpointing | activations GiB | 1 GPU | 4 GPUs DDP | 4 GPUs FSDP2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rec:
        out.append(
            f"| {r['input']} | {r['tokens']} | {r['scenario']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['activations_gib']:.2f} | {r['ddp1_gib']:.2f} | {r['ddp4_gib']:.2f} | {r['fsdp4_gib']:.2f} |"
        )
    return "\n".join(out)


def run(calibrate: bool = True) -> dict:
    rec = recipe()
    cal = []
    if calibrate:
        with tempfile.TemporaryDirectory() as tmp:
            cal = calibration(Path(tmp))
    print(tables(cal, rec))
    return {"calibration": cal, "recipe": rec}
