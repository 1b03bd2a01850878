"""`sensorvla plan` on real-size architectures (meta device only) and on a dataset; the command line."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from sensorvla.cli import main  # noqa: E402
from sensorvla.config import SensorVLAConfig  # noqa: E402
from sensorvla.plan.planner import format_plan, plan  # noqa: E402

QWEN3B = "random:Qwen/Qwen2.5-VL-3B-Instruct"
GIB = 2**30


def cfg_3b(stage: str = "stage1") -> SensorVLAConfig:
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = QWEN3B
    cfg.train.batch_size, cfg.train.grad_accum_steps = 4, 8
    cfg.train.stage = stage
    cfg.model.finetune.mode = "lora" if stage == "stage2" else "none"
    return cfg


class _LargestRealTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_stage1_plan_of_the_3b_without_materializing_weights():
    cfg = cfg_3b()
    cfg.model.backbone.pooling = "view_mean"  # the arithmetic below counts 2 tokens per sample
    with _LargestRealTensor() as rec:
        p = plan(cfg, gpus=(1, 4))
    assert rec.largest < 16 * 2**20  # processor outputs only; a single 3B weight matrix alone is 600 MiB
    groups = {g.group: g for g in p.groups}
    assert groups["vision"].params + groups["language"].params == 3_754_622_976
    assert groups["vision"].trainable == groups["language"].trainable == 0
    uncached, cached = p.scenarios
    assert uncached.name == "stage1 none uncached" and cached.name == "stage1 none cached"
    assert uncached.states.weights["bfloat16"] == 2 * 3_754_622_976
    # a frozen backbone keeps nothing for backward: only the trainable tail does
    assert all(b.cost.retained == 0 for b in uncached.blocks if b.name != "policy.tail")
    assert uncached.dynamic.act > cached.dynamic.act
    # 4 GPUs: FSDP2 shards the 36 decoder layers, DDP replicates everything
    assert uncached.per_gpu["fsdp"][4] < uncached.per_gpu["ddp"][4]
    assert 6.9 * GIB < uncached.per_gpu["ddp"][1] < 8 * GIB
    # 2 tokens per sample (1 view + instruction): fp16 features, fp16 positions, a mask byte; + the index
    assert p.cache_bytes == 15000 * 2 * (2048 * 2 + 3 * 2 + 1) + 15000 * 16
    text = format_plan(p)
    assert "peak memory per GPU" in text and "stage1 none cached" in text


def test_a_cached_stage1_plan_holds_no_backbone():
    """The trainer builds a stage 1 from the VL cache without the backbone's weights: the plan of the 3B's cached
    run is the trainable tail, its AdamW states and the cached batches (the issue's <= 4 GB on one GPU), on every
    strategy (FSDP2 units of the backbone are not there to shard)."""
    from sensorvla.plan.planner import CACHED_STAGE1_LOADS_BACKBONE

    assert CACHED_STAGE1_LOADS_BACKBONE is False
    p = plan(cfg_3b(), gpus=(1, 4))
    uncached, cached = p.scenarios
    assert cached.states.weights["bfloat16"] == 0  # the 7 GiB of bf16 backbone weights are not loaded
    assert cached.per_gpu["ddp"][1] < 0.5 * GIB < 6.9 * GIB < uncached.per_gpu["ddp"][1]
    assert cached.per_gpu["fsdp"][4] <= cached.per_gpu["ddp"][1]


def test_stage2_lora_plan_counts_adapters_and_checkpointing():
    p = plan(cfg_3b("stage2"), gpus=(1,))
    (sc,) = p.scenarios
    groups = {g.group: g for g in p.groups}
    assert groups["vl_lora"].trainable == 7_372_800  # r=16 on q/k/v/o of 36 layers (offline-stack.md: 7.37 M)
    assert groups["language"].trainable == 0
    assert sc.states.weights["bfloat16"] == 2 * (3_754_622_976 + 7_372_800)  # PEFT casts adapters to bf16
    # every decoder layer keeps its activations for backward; checkpointing keeps only the layer inputs
    layers = next(b for b in sc.blocks if b.name == "language.layers")
    assert layers.count == 36 and layers.cost.retained > 20 * 2**20
    assert sc.act_peak_on < sc.act_peak_off / 5
    assert p.cache_bytes is None


def test_plan_reads_shapes_from_the_dataset(tiny_vl_dir, synth_dataset_dir):
    from sensorvla.data.format import load_meta
    from sensorvla.training.data_setup import raw_dataset

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.data.dataset_dir = str(synth_dataset_dir)
    p = plan(cfg, device="cpu", gpus=(1,))
    meta = load_meta(synth_dataset_dir)
    assert p.shapes.num_views == len(meta.views)
    assert p.image_hw == tuple(meta.image_shape[:2])
    ds = raw_dataset(cfg, "all", load_images=False)
    assert p.num_samples == len({ds.vl_key(i) for i in range(len(ds))}) < len(ds)  # cache rows: 5 Hz cameras
    assert p.backbone_dtype == "float32"  # auto on CPU
    assert p.shapes.action_dim == meta.action_dim


def test_cli_plan_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "--vl-model",
            QWEN3B,
            "--training-stage",
            "stage2",
            "--batch-size",
            "2",
            "--gpus",
            "1,2",
            "--views",
            "2",
            "--image-size",
            "112x112",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "vl_lora" in text and "FSDP2" in text
    data = json.loads(out.read_text())
    assert data["shapes"]["num_views"] == 2 and data["batch"] == 2
    assert set(data["scenarios"][0]["per_gpu"]["ddp"]) == {"1", "2"}


def test_cli_plan_errors_name_the_fix(capsys, tmp_path):
    assert main(["plan", "--vl-model", QWEN3B, "--gpus", "one"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert main(["plan", "--vl-model", QWEN3B, "--image-size", "224"]) == 2
    assert "--image-size HxW" in capsys.readouterr().err
    assert main(["plan", "--vl-model", QWEN3B, "--measure-steps", "2", "--views", "1"]) == 2
    assert "--data.dataset-dir" in capsys.readouterr().err
    assert main(["plan", "--vl-model", "random:Qwen/Nope"]) == 1
    assert "random:Qwen/Qwen2.5-VL-3B-Instruct" in capsys.readouterr().err
    assert main(["plan", "--help"]) == 0
    assert "meta device" in capsys.readouterr().out


def test_hub_id_without_a_local_copy_is_planned_from_the_shipped_config():
    cfg = cfg_3b()
    cfg.model.backbone.vl_model = "Qwen/Qwen2.5-VL-3B-Instruct"  # the default backbone, not downloaded here
    p = plan(cfg, gpus=(1,))
    assert any("shipped config" in n for n in p.notes)
    assert sum(g.params for g in p.groups if g.group in ("vision", "language")) == 3_754_622_976


@pytest.mark.parametrize("name", ["random:Qwen/Qwen3-VL-8B-Instruct", "random:Qwen/Qwen2-VL-7B-Instruct"])
def test_other_families_plan_on_meta(name):
    cfg = cfg_3b("stage2")
    cfg.model.backbone.vl_model = name
    cfg.model.backbone.activation_checkpointing = True
    p = plan(cfg, gpus=(1, 8))
    (sc,) = p.scenarios
    assert sc.dynamic.act == sc.act_peak_on < sc.act_peak_off
    assert sc.per_gpu["fsdp"][8] < sc.per_gpu["ddp"][1]


@pytest.mark.parametrize("pooling", ["grid", "all", "resampler"])
def test_token_modes_size_the_cache_and_the_tail(tiny_vl_dir, synth_dataset_dir, pooling):
    from sensorvla.plan.activations import vl_token_count

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.model.backbone.pooling = pooling
    cfg.data.dataset_dir = str(synth_dataset_dir)
    p = plan(cfg, device="cpu", gpus=(1,))
    tokens = vl_token_count(pooling, p.shapes, grid_size=4, num_queries=8)
    expected = {"grid": p.shapes.num_views * 16 + 1, "all": None, "resampler": p.shapes.seq_len}[pooling]
    assert expected is None or tokens == expected
    assert p.cache_bytes == p.num_samples * (tokens * (64 * 2 + 3 * 2 + 1) + 16)


def _planned_and_real_tail(vl_dir, data_dir, pooling: str, keypoints: int):
    """(the planner's VL token count, the real model's encoded and projected token counts, the planner's probe of
    the tail, the same tail probed on the real model and its real encoded features) for a batch of 2, fp32."""
    import copy

    import numpy as np

    from sensorvla.config import resolve_from_meta
    from sensorvla.data.format import load_meta
    from sensorvla.models.backbone import collate_vl, load_processor, pad_token_id, process_sample
    from sensorvla.models.policy import build_policy
    from sensorvla.plan.activations import vl_token_count
    from sensorvla.plan.probe import emulate_sdpa, probe

    b = 2
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model, cfg.data.dataset_dir = str(vl_dir), str(data_dir)
    cfg.model.backbone.pooling, cfg.model.backbone.keypoints, cfg.model.backbone.dtype = pooling, keypoints, "float32"
    cfg.train.batch_size = b
    p = plan(cfg, device="cpu", gpus=(1,))
    bb, s = cfg.model.backbone, p.shapes
    planned_in = vl_token_count(pooling, s, grid_size=bb.grid_size, num_queries=bb.num_queries)
    (planned,) = [blk.cost for blk in p.scenarios[0].blocks if blk.name == "policy.tail"]

    real = resolve_from_meta(copy.deepcopy(cfg).validate(), load_meta(data_dir))
    policy = build_policy(real).train()  # the trainer's modes: the frozen HF base in eval, the rest training
    policy.backbone.model.eval()
    proc = load_processor(str(vl_dir), min_pixels=bb.min_pixels, max_pixels=bb.max_pixels)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (*p.image_hw, 3), dtype=np.uint8) for _ in range(real.model.num_views)]
    sample = process_sample(proc, images, "insert the peg", bb.prompt_template)
    with torch.no_grad():
        vl = policy.backbone.encode(collate_vl([sample] * b, pad_token_id(proc)))
        projected = policy.backbone.project(vl.feats, vl.mask, vl.pos)[0].shape[1]
    params = [q for n, q in policy.named_parameters() if not n.startswith("backbone.model.")]

    def inputs():  # what the trainer's batch holds after the VL pass (or from the cache)
        batch = {
            "vl_features": vl.feats.clone(),
            "vl_mask": vl.mask.clone(),
            "vl_pos": vl.pos.clone(),
            "sensor": torch.zeros(b, s.sensor_samples, max(s.sensor_channels, 1)),
            "sensor_mask": torch.ones(b, s.sensor_samples, dtype=torch.bool),
            "has_sensor": torch.ones(b, dtype=torch.bool),
            "actions": torch.zeros(b, s.horizon, s.action_dim),
            "action_mask": torch.ones(b, s.horizon, dtype=torch.bool),
        }
        if s.state_dim:
            batch["state"] = torch.zeros(b, s.state_dim)
        return (batch,)

    def step(batch):
        cond, mask = policy.condition(batch)
        return policy.head.loss(cond, mask, batch["actions"], batch["action_mask"]).mean()

    with emulate_sdpa("cpu"):
        measured = probe(step, inputs, params=params)
    return planned_in, vl.feats.shape[1], projected, planned, measured


@pytest.mark.parametrize("pooling", ["all", "grid"])
def test_keypoint_mode_is_planned_from_the_models_real_shapes(tiny_vl_dir, synth_dataset_dir, pooling):
    """--model.backbone.keypoints K: the backbone's `encode` (and so the VL cache and the tail's input) holds every
    token of the token mode, and only the trainable projection turns each view's tokens into K. The planner counts
    the first (`vl_token_count`: the cache's size, the cached batch, the tail's input) and probes the real
    projection, so what follows the keypoint layer is sized for K tokens per view: what keypoints change in the
    planned tail (forward peak, retained, backward peak) is, to the byte, what they change in the same tail run on
    the real model's encoded features. Counting K tokens per view as the input would miss the keypoint layer's
    scores over every token; counting every token after it would over-count the fusion and the head."""
    k = 3
    plain_in, plain_enc, plain_proj, plain_plan, plain_real = _planned_and_real_tail(
        tiny_vl_dir, synth_dataset_dir, pooling, 0
    )
    kp_in, kp_enc, kp_proj, kp_plan, kp_real = _planned_and_real_tail(tiny_vl_dir, synth_dataset_dir, pooling, k)
    assert kp_in == kp_enc == plain_in == plain_enc == plain_proj  # the cache and the keypoint layer: every token
    assert kp_proj == 2 * k + 1 != kp_in  # after the keypoint layer: K per view (2 views) + the instruction
    assert kp_plan != plain_plan  # the planner sees the keypoint layer
    for field in ("fwd_peak", "retained", "bwd_peak"):
        planned = getattr(kp_plan, field) - getattr(plain_plan, field)
        real = getattr(kp_real, field) - getattr(plain_real, field)
        # a few bytes apart at most (meta and CPU differ on scalar and mask temporaries, not on token tensors)
        why = f"{field}: keypoints change the planned tail by {planned} B, the real one by {real} B"
        assert abs(planned - real) <= max(64, abs(real) // 100), why
