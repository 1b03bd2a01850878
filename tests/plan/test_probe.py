"""Meta-device activation probes: the live-bytes tracker, probes of modules with known saved tensors, the fused
attention emulation, the step-peak sum, and a real Qwen decoder layer probed on meta vs run on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sensorvla.plan.activations import Block, StepPeak, step_peak  # noqa: E402
from sensorvla.plan.probe import Probe, emulate_sdpa, probe  # noqa: E402
from sensorvla.plan.tracker import LiveBytes  # noqa: E402


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tracker_counts_live_storages(device):
    with LiveBytes() as lb:
        a = torch.empty(1000, device=device)  # 4000 B
        b = torch.empty(2000, device=device)  # 8000 B
        assert lb.current == 12_000
        del a
        c = torch.empty(500, device=device)  # the freed 4000 B are gone: 10_000 live
        v = b[:10].view(2, 5)  # a view adds nothing
        b.add_(1)  # in place adds nothing
        assert (lb.current, lb.peak) == (10_000, 12_000)
        lb.mark()
        assert lb.peak == 10_000
        del b, v, c
        torch.empty(1, device=device)
        assert lb.current == 4


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_probe_of_an_mlp_has_the_known_saved_tensors(device):
    """Linear saves its input (weight grad), ReLU its output (also the second Linear's input): x and r."""
    mlp = _mlp().to(device)
    b = 4
    x_bytes, h_bytes, y_bytes = b * 16 * 4, b * 64 * 4, b * 8 * 4
    res = probe(mlp, lambda: (torch.randn(b, 16, device=device, requires_grad=True),), params=list(mlp.parameters()))
    assert res.retained == x_bytes + h_bytes
    assert res.out_bytes == y_bytes
    assert res.fwd_peak == x_bytes + 2 * h_bytes  # x, the pre-activation and the ReLU output at once
    assert res.bwd_peak > res.retained + res.out_bytes
    frozen = probe(mlp, lambda: (torch.randn(b, 16, device=device),), params=list(mlp.parameters()), backward=False)
    assert frozen.retained == x_bytes + h_bytes  # params still require grad


def test_probe_meta_equals_cpu_for_the_mlp_backward():
    cpu, meta = _mlp(), _mlp().to("meta")
    mk = {d: (lambda d=d: (torch.randn(4, 16, device=d, requires_grad=True),)) for d in ("cpu", "meta")}
    assert probe(cpu, mk["cpu"], params=list(cpu.parameters())) == probe(
        meta, mk["meta"], params=list(meta.parameters())
    )


def test_nothing_is_retained_without_grad():
    mlp = _mlp().requires_grad_(False)
    res = probe(mlp, lambda: (torch.randn(4, 16, device="cpu"),), params=list(mlp.parameters()))
    assert (res.retained, res.bwd_peak) == (0, 0) and res.fwd_peak > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_emulation_saves_what_the_cpu_kernel_saves(dtype):
    def saved(device, target):
        q = torch.randn(2, 8, 96, 32, device=device, dtype=dtype, requires_grad=True)
        kv = [torch.randn(2, 2, 96, 32, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
        shapes = []
        with (
            emulate_sdpa(target),
            torch.autograd.graph.saved_tensors_hooks(
                lambda t: shapes.append((tuple(t.shape), t.dtype)) or t, lambda t: t
            ),
        ):
            F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)
        return sorted(shapes, key=str)

    cpu = saved("cpu", "cpu")
    assert saved("meta", "cpu") == cpu
    assert all(96 * 96 not in (s[-1] * s[-2] if len(s) > 1 else 0,) for s, _ in cpu)  # no L x L probabilities
    cuda = saved("meta", "cuda")
    assert max(torch.Size(s).numel() for s, _ in cuda) == 2 * 8 * 96 * 32  # q / out / expanded k, v; no L x L


def test_step_peak_sums_blocks_in_order():
    a = Block("a", 3, Probe(fwd_peak=50, retained=10, bwd_peak=40, out_bytes=1), grad_bytes=5)
    b = Block("b", 2, Probe(fwd_peak=100, retained=20, bwd_peak=70, out_bytes=1), grad_bytes=7)
    frozen = Block("f", 1, Probe(fwd_peak=500, retained=0, bwd_peak=0, out_bytes=1))
    # gradients kept (accumulation): forward of b's last instance 3*10 + 1*20 + 100 = 150, plus G = 3*5 + 2*7
    assert step_peak([a, b], grads_persist=True) == StepPeak(peak=150 + 29, grads=29, saved=70)
    # no accumulation: forward 150 without gradients; b's first backward 30 + 20 + 70 + 7 = 127 < 150
    assert step_peak([a, b], grads_persist=False) == StepPeak(peak=150, grads=0, saved=70)
    # a frozen block before the trainable ones: its transient peak counts, nothing is retained
    assert step_peak([frozen, a, b], grads_persist=False).peak == 500


def _tiny_layer(tiny_vl_dir, device, dtype, lora):
    from peft import inject_adapter_in_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from sensorvla.config import FinetuneConfig
    from sensorvla.models import finetune
    from sensorvla.plan.planner import cast_meta_adapters

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_vl_dir), dtype=dtype)
        model.requires_grad_(False)
        if lora:
            inject_adapter_in_model(finetune.lora_config(FinetuneConfig(mode="lora")), model.model, "default")
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
            cast_meta_adapters(model)  # what PEFT does for real weights (a no-op on CPU)
    return model.train().model.language_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [False, True])
def test_decoder_layer_probe_on_meta_equals_cpu(tiny_vl_dir, dtype, lora):
    """The same HF decoder layer, probed on meta (no weights) and run for real on CPU, accounts the same bytes."""
    results = {}
    for device in ("cpu", "meta"):
        lm = _tiny_layer(tiny_vl_dir, device, dtype, lora)
        layer = lm.layers[1]
        pos = torch.arange(40, device=device).view(1, 1, 40).expand(3, 4, 40)

        def fn(x, lm=lm, layer=layer, pos=pos):
            return layer(x, position_embeddings=lm.rotary_emb(x, pos), attention_mask=None)

        with emulate_sdpa("cpu"):
            results[device] = probe(
                fn,
                lambda device=device: (torch.randn(4, 40, 64, device=device, dtype=dtype, requires_grad=True),),
                params=list(layer.parameters()),
            )
    assert results["meta"] == results["cpu"]
    assert results["cpu"].retained > 0
