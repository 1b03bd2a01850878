"""The planner's arithmetic on toy modules with known sizes: groups, states by dtype, optimizer temporaries,
per-GPU formulas, and the VL cache size against a cache the trainer really writes."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sensorvla.plan import memory  # noqa: E402

BF16 = torch.bfloat16


class FooDecoderLayer(nn.Module):
    def __init__(self, d: int, dtype=torch.float32):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False, dtype=dtype)


def toy_policy() -> nn.Module:
    """Names follow VLAPolicy, so `group_of` maps them: 44 + 9 + 15 trainable fp32 params outside the backbone,
    a frozen bf16 vision (72) and language model (embedding 800 tied to the output head + 2 layers of 64),
    16 trainable fp32 LoRA params and a 4-float buffer."""
    root = nn.Module()
    root.head = nn.Linear(10, 4)
    root.fusion = nn.Linear(3, 3, bias=False)
    root.sensor_encoder = nn.Sequential(nn.Linear(2, 5))
    root.backbone = nn.Module()
    root.backbone.model = nn.Module()
    root.backbone.model.visual = nn.Linear(8, 8, dtype=BF16)
    lm = nn.Module()
    lm.embed = nn.Embedding(100, 8, dtype=BF16)
    lm.out = nn.Linear(8, 100, bias=False, dtype=BF16)
    lm.out.weight = lm.embed.weight  # tied: one tensor
    lm.layers = nn.ModuleList([FooDecoderLayer(8, BF16) for _ in range(2)])
    lm.lora_A = nn.Linear(8, 2, bias=False)
    lm.register_buffer("inv_freq", torch.zeros(4))
    root.backbone.model.language_model = lm
    for n, p in root.named_parameters():
        p.requires_grad_(not n.startswith("backbone.model.") or "lora_" in n)
    return root


def test_groups_count_each_parameter_once():
    rows = {r.group: r for r in memory.group_rows(toy_policy())}
    assert {g: (r.params, r.trainable) for g, r in rows.items()} == {
        "head": (44, 44),
        "fusion": (9, 9),
        "sensor_encoder": (15, 15),
        "vision": (72, 0),
        "language": (800 + 2 * 64, 0),
        "vl_lora": (16, 16),
    }


def test_states_by_dtype():
    st = memory.states(toy_policy())
    assert st.weights == {"bfloat16": (72 + 800 + 128) * 2, "float32": (44 + 9 + 15 + 16) * 4 + 4 * 4}
    assert st.grads == {"float32": 84 * 4}
    # exp_avg + exp_avg_sq in the param dtype, plus a 4-byte step for each of the 6 trainable tensors
    assert st.optimizer == {"float32": 2 * 84 * 4 + 6 * 4}
    assert (st.w, st.g, st.o) == (2000 + 352, 336, 696)


def test_states_match_a_real_adamw_step():
    """The optimizer bytes are what torch's AdamW actually allocates after one step."""
    model = toy_policy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    real = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert real == memory.states(model).o


def test_optimizer_temporaries():
    model = toy_policy()
    groups = [[model.head.weight, model.head.bias], [model.sensor_encoder[0].weight], [model.fusion.weight]]
    assert memory.optimizer_transient(model, groups, "fused") == 0
    assert memory.optimizer_transient(model, groups, "for-loop") == 2 * 40 * 4  # the largest tensor, twice
    assert memory.optimizer_transient(model, groups, "foreach") == 44 * 4  # the largest group
    with pytest.raises(ValueError, match="optimizer-impl"):
        memory.optimizer_transient(model, groups, "sgd")


def test_fsdp_units_follow_the_wrap_rule():
    u = memory.fsdp_units(toy_policy())
    assert u.count == 2 and u.unit_w == 64 * 2 and u.unit_g == 0
    assert u.root_w == memory.states(toy_policy()).w - 2 * u.unit_w
    assert u.root_g == 84 * 4


def test_per_gpu_formulas():
    st = memory.States(weights={"bfloat16": 8000}, grads={"float32": 400}, optimizer={"float32": 800})
    units = memory.Units(root_w=2000, root_g=100, unit_w=500, unit_g=50, count=12)
    d = memory.Dynamic(act=1000, act_grads=400, opt_tmp=300, batch=10)
    assert memory.per_gpu_peak(st, units, d, "ddp", 1) == 8000 + 800 + (1000 + 400)
    assert memory.per_gpu_peak(st, units, d, "ddp", 4) == 8000 + 800 + 400 + (1000 + 400)  # + gradient buckets
    g4 = 400 // 4 + 100 + 50
    assert memory.per_gpu_peak(st, units, d, "fsdp", 4) == (
        8000 // 4 + 2000 + 2 * 500 + 800 // 4 + 1000 + int(400 * g4 / 400)
    )
    assert memory.per_gpu_peak(st, units, d, "fsdp", 1) == memory.per_gpu_peak(st, units, d, "ddp", 1)
    with pytest.raises(ValueError, match="gpus"):
        memory.per_gpu_peak(st, units, d, "ddp", 0)


def test_dynamic_moments():
    d = memory.Dynamic(act=1000, act_grads=0, opt_tmp=300, batch=10, accumulate=False, validation=False)
    assert memory.dynamic_peak(d, 400, 400) == 1000  # a micro-batch whose gradients come after its peak
    small = memory.Dynamic(act=10, act_grads=0, opt_tmp=300, batch=10, accumulate=False, validation=False)
    assert memory.dynamic_peak(small, 400, 400) == 400 + 300  # the optimizer step
    data = memory.Dynamic(act=10, act_grads=0, opt_tmp=0, batch=1000, accumulate=True, validation=False)
    assert memory.dynamic_peak(data, 400, 400) == 2 * 1000 + 400  # collating the next micro-batch
    val = memory.Dynamic(act=10, act_grads=0, opt_tmp=0, batch=1000, accumulate=False, validation=True)
    assert memory.dynamic_peak(val, 400, 400) == 2 * 1000  # validation: 2 batches, gradients are freed


def test_cache_size_is_what_the_trainer_writes(tiny_vl_dir, synth_dataset_dir, tmp_path):
    from sensorvla.config import SensorVLAConfig
    from sensorvla.data.format import load_meta
    from sensorvla.training.data_setup import raw_dataset
    from sensorvla.training.loop import train

    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.data.dataset_dir = str(synth_dataset_dir)
    cfg.train.output_dir = str(tmp_path)
    cfg.model.backbone.pooling = "view_mean"
    cfg.train.mode, cfg.train.batch_size, cfg.train.tensorboard = "cache", 16, False
    folder = Path(train(copy.deepcopy(cfg), progress=False)["cache_dir"])
    on_disk = sum(f.stat().st_size for f in folder.glob("shard-*"))  # token rows + index
    ds = raw_dataset(cfg, "all", load_images=False)
    n = len({ds.vl_key(i) for i in range(len(ds))})  # one row per distinct camera frame set
    views = len(load_meta(synth_dataset_dir).views)
    planned = memory.cache_bytes(n, views + 1, 64, "float16")
    assert abs(planned / on_disk - 1) < 0.02, (planned, on_disk)
    rows = sum(f.stat().st_size for f in folder.glob("shard-*.bin"))
    assert planned - memory.INDEX_BYTES_PER_SAMPLE * n == rows  # the token rows exactly
