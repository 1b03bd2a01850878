"""`sensorvla demo`: the whole two-stage recipe, offline, on the tiny Qwen-VL and the synthetic dataset.

tiny model -> synthetic data -> stats -> one forward/backward per head -> stage-1 VL cache -> stage 1
(frozen VL, from the cache) -> stage 2 (LoRA, from the stage-1 checkpoint) -> offline eval with sensor
ablation and plots -> closed-loop rollouts. Everything lands under `out/`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger("sensorvla.demo")


def base_config(vl_dir: Path, data_dir: Path, out: Path, head: str):
    from sensorvla.config import SensorVLAConfig

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(vl_dir)
    cfg.model.head.type = head
    cfg.data.dataset_dir = str(data_dir)
    cfg.train.output_dir = str(out)
    cfg.train.batch_size = 16
    cfg.train.grad_accum_steps = 1
    cfg.train.lr = 1e-3
    cfg.train.sensor_lr = 1e-3
    cfg.train.vl_lr = 1e-4
    cfg.train.warmup_ratio = 0.05
    cfg.train.patience = 0
    cfg.train.log_every_steps = 20
    return cfg


def smoke_heads(vl_dir: Path, data_dir: Path) -> None:
    """One forward + backward per head on a real batch; prints losses and the parameter table."""
    import torch

    from sensorvla.config import SensorVLAConfig
    from sensorvla.data.format import load_meta
    from sensorvla.data.normalize import NormStats
    from sensorvla.models.backbone import load_processor, pad_token_id
    from sensorvla.models.pretrained import build_policy, resolve_from_meta
    from sensorvla.models.processor import SampleTransform, collate
    from sensorvla.training.data_setup import build_normalizer, raw_dataset, stats_path
    from sensorvla.training.param_groups import build_param_groups, group_table

    for head in ("regression", "diffusion", "flow"):
        cfg = SensorVLAConfig()
        cfg.model.backbone.vl_model = str(vl_dir)
        cfg.model.head.type = head
        cfg.data.dataset_dir = str(data_dir)
        cfg = resolve_from_meta(cfg, load_meta(data_dir))
        policy = build_policy(cfg)
        proc = load_processor(
            str(vl_dir), min_pixels=cfg.model.backbone.min_pixels, max_pixels=cfg.model.backbone.max_pixels
        )
        norm = build_normalizer(NormStats.load(stats_path(data_dir)), cfg)
        tf = SampleTransform(norm, proc, cfg.model.backbone.prompt_template, cfg.model.state_dim)
        ds = raw_dataset(cfg, "train")
        batch = collate([tf(ds[i]) for i in range(4)], pad_token_id(proc))
        loss, _ = policy(batch)
        loss.backward()
        grads = sum(int(p.grad is not None) for p in policy.parameters() if p.requires_grad)
        print(f"[smoke] head={head:<10} loss={float(loss):.4f}  tensors with grad={grads}")
        if head == "regression":
            print(group_table(policy, build_param_groups(policy, cfg.train)))
        del policy
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_demo(out: Path, *, head: str = "regression", episodes: int = 24, quick: bool = False) -> dict:
    from sensorvla.data.normalize import compute_stats
    from sensorvla.data.synth import generate_dataset
    from sensorvla.models.tiny_qwen import build_tiny_qwen_vl
    from sensorvla.training.checkpoint import BEST_NAME
    from sensorvla.training.data_setup import stats_path
    from sensorvla.training.loop import train

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vl_dir = build_tiny_qwen_vl(out / "tiny_qwen2_5_vl", family="qwen2_5_vl")
    data_dir = out / "data"
    if not (data_dir / "meta" / "info.json").exists():
        generate_dataset(data_dir, num_episodes=episodes, seed=0)
    compute_stats(data_dir).save(stats_path(data_dir))
    smoke_heads(vl_dir, data_dir)

    s1_dir, s2_dir = out / "stage1", out / "stage2"
    cfg1 = base_config(vl_dir, data_dir, s1_dir, head)
    cfg1.train.epochs = 4 if quick else 30
    cfg1.train.use_cache = "always"
    cache_cfg = copy.deepcopy(cfg1)
    cache_cfg.train.mode = "cache"
    print("[demo] stage 1: building the VL feature cache")
    train(cache_cfg)
    print("[demo] stage 1: sensor encoder + action expert, frozen VL, from the cache")
    r1 = train(cfg1)

    cfg2 = base_config(vl_dir, data_dir, s2_dir, head)
    cfg2.train.stage = "stage2"
    cfg2.train.stage1_checkpoint = str(s1_dir / "checkpoints" / BEST_NAME)
    cfg2.model.finetune.mode = "lora"
    cfg2.train.epochs = 1 if quick else 3
    cfg2.train.lr = 3e-4
    cfg2.train.sensor_lr = 3e-4
    print("[demo] stage 2: LoRA on the VL backbone + everything else, from the stage-1 checkpoint")
    r2 = train(cfg2)

    ckpt = s2_dir / "checkpoints" / "pretrained_model"
    from sensorvla.eval.offline import evaluate

    print("[demo] offline evaluation on held-out episodes (with sensor ablation)")
    metrics = evaluate(ckpt, data_dir, split="test", out_dir=out / "eval")
    print("[demo] closed-loop rollouts in the built-in insertion environment")
    import gymnasium as gym

    from sensorvla.eval.envs import register_envs
    from sensorvla.eval.rollout import rollout
    from sensorvla.inference.runner import PolicyRunner

    register_envs()
    runner = PolicyRunner.from_pretrained(ckpt)
    n_eps = 4 if quick else 10
    roll = rollout(runner, gym.make("sensorvla/Insertion-v0"), episodes=n_eps, video_dir=out / "rollout")
    roll_blind = rollout(runner, gym.make("sensorvla/Insertion-v0"), episodes=n_eps, ablate_sensor=True)
    summary = {
        "stage1_best_val": r1["best_val"],
        "stage2_best_val": r2["best_val"],
        "stage1_steps": r1["steps"],
        "stage2_steps": r2["steps"],
        "eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "rollout_success": roll.get("success_rate"),
        "rollout_success_sensor_ablated": roll_blind.get("success_rate"),
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary, indent=2, default=float))
    print(f"[demo] done in {summary['wall_s']:.0f}s. Report: {out / 'eval' / 'report.md'}")
    return summary
