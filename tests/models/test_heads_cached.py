"""Sampling heads compute the conditioning once per call and reuse it at every denoising step: the step path
equals the per-step training forward (same seed, atol 1e-6), with and without padded condition tokens. These are
the `decoder` denoiser's (`--model.head.denoiser decoder`, which cross-attends at every step); the `mlp`
denoiser's are in test_denoisers.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from sensorvla.config import HeadConfig
from sensorvla.models.heads import build_head
from sensorvla.models.heads.flow import TIME_SCALE

B, N_C, COND_DIM = 3, 11, 24


def make(kind: str, steps: int, **kw):
    torch.manual_seed(0)
    kw.setdefault("denoiser", "decoder")
    cfg = HeadConfig(type=kind, horizon=6, action_dim=4, hidden_dim=32, num_heads=4, num_inference_steps=steps, **kw)
    return build_head(cfg, COND_DIM).eval()


def cond(padded: bool):
    g = torch.Generator().manual_seed(1)
    c, m = torch.randn(B, N_C, COND_DIM, generator=g), torch.ones(B, N_C, dtype=torch.bool)
    if padded:
        m[1, 4:] = False  # a shorter sample: padded tokens must not matter
        c[1, 4:] = 1e4  # ...even with huge values
    return c, m


@pytest.mark.parametrize("padded", [False, True])
def test_denoiser_step_equals_forward(padded):
    den = make("diffusion", 10).denoiser
    c, m = cond(padded)
    x = torch.randn(B, 6, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([99, 57, 3])
    with torch.no_grad():
        ctx = den.context(den.memory(c, m))
        assert bool(ctx.mask.all()) == (not padded)
        for ti in t:
            (emb,) = den.step_embeddings(ti.view(1))
            torch.testing.assert_close(den.step(x, emb, ctx), den(x, ti.expand(B), c, m), atol=1e-6, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_flow_sampling_equals_the_per_step_forward(padded):
    head = make("flow", 5)
    c, m = cond(padded)
    got = head.sample(c, m, generator=torch.Generator().manual_seed(0))
    x = torch.randn(B, 6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(5):  # the original loop: the full forward at every step
            t = torch.full((B,), 1.0 - i / 5)
            x = x + (-1 / 5) * head.velocity(x, t * TIME_SCALE, c, m)
    torch.testing.assert_close(got, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [10, 3])
def test_ddim_sampling_equals_diffusers_with_the_per_step_forward(steps):
    """The original loop (a DDIM scheduler's step() over the full forward). DDIM divides by sqrt(alpha_bar) ~ 1e-2
    at t = T - 1, so an untrained denoiser's samples reach ~1e3: the tolerance is 1e-6 of the sample's scale."""
    head = make("diffusion", steps)
    c, m = cond(True)
    got = head.sample(c, m, generator=torch.Generator().manual_seed(0))
    sched = DDIMScheduler.from_config(head.sample_scheduler.config)
    sched.set_timesteps(steps)
    x = torch.randn(B, 6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(head.denoiser(x, t.expand(B), c, m), t, x, eta=0.0).prev_sample
    assert (got - x).abs().max() <= 1e-6 * x.abs().max()
    assert torch.equal(head.ddim_scheduler(steps).timesteps, sched.timesteps)  # the cached schedule is diffusers'


@pytest.mark.parametrize("steps", [10, 3])
def test_ddim_update_is_bit_equal_to_the_rederived_one(steps):
    """The DDIM step runs through diffusers' `DDIMScheduler.step`; its result is bit-equal to the eta = 0 update
    the head used to re-derive on Python-float coefficients (the same float32 alphas, combined in float64)."""
    head = make("diffusion", steps)
    g = torch.Generator().manual_seed(3)
    eps = [torch.randn(B, 6, 4, generator=g) * 10 for _ in range(steps)]
    noise = head.noise(B, torch.zeros(()), torch.Generator().manual_seed(0))
    got = head.integrate(lambda x, i, t: eps[i], noise, steps)
    sched = DDIMScheduler.from_config(head.sample_scheduler.config)
    sched.set_timesteps(steps)
    x = torch.randn(B, 6, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(sched.timesteps.tolist()):
        prev = t - sched.config.num_train_timesteps // steps
        a_t = sched.alphas_cumprod[t].item()
        a_prev = sched.alphas_cumprod[prev].item() if prev >= 0 else sched.final_alpha_cumprod.item()
        x0 = (x - (1 - a_t) ** 0.5 * eps[i]) / a_t**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps[i]
    assert torch.equal(got, x)


def test_conditioning_is_computed_once_per_call():
    head = make("diffusion", 10)
    calls = []
    head.denoiser.cond_proj.register_forward_hook(lambda *a: calls.append(1))
    head.sample(*cond(False), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1  # the per-step forward projected the condition 10 times


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_active_dropout_samples_through_the_training_forward(kind):
    """In train mode with dropout the step path (eval semantics) would change the result: the forward runs."""
    head = make(kind, 4, dropout=0.5).train()
    den = head.denoiser if kind == "diffusion" else head.velocity
    assert not den.uses_step_path() and den.eval().uses_step_path()
    den.train()
    calls = []
    den.register_forward_hook(lambda *a: calls.append(1))
    head.sample(*cond(False), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4


@pytest.mark.parametrize("padded", [False, True])
def test_decode_equals_the_torch_decoder_in_value_and_gradient(padded):
    """`decode` (the heads' training path) is `nn.TransformerDecoder` with the same parameters: outputs and
    every parameter's gradient match, with padded memory tokens, and dropout layers in eval mode."""
    from sensorvla.models.heads.base import decode

    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(32, 4, 128, 0.1, activation="gelu", batch_first=True, norm_first=True)
    dec = torch.nn.TransformerDecoder(layer, 2).eval()
    c, m = cond(padded)
    mem = torch.nn.Linear(COND_DIM, 32)(c).detach().requires_grad_(True)
    tgt = torch.randn(B, 6, 32, requires_grad=True)
    ref = dec(tgt, mem, memory_key_padding_mask=~m)
    ref_grads = torch.autograd.grad(ref.square().sum(), [tgt, mem, *dec.parameters()])
    got = decode(dec, tgt, mem, m)
    got_grads = torch.autograd.grad(got.square().sum(), [tgt, mem, *dec.parameters()])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_decode_applies_dropout_in_training_and_refuses_post_norm():
    from sensorvla.models.heads.base import decode

    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(32, 4, 128, 0.5, batch_first=True, norm_first=True)
    dec = torch.nn.TransformerDecoder(layer, 1).train()
    tgt, mem, m = torch.randn(B, 6, 32), torch.randn(B, 5, 32), torch.ones(B, 5, dtype=torch.bool)
    assert not torch.equal(decode(dec, tgt, mem, m), decode(dec, tgt, mem, m))  # dropout is drawn in training
    dec.eval()
    torch.testing.assert_close(decode(dec, tgt, mem, m), dec(tgt, mem), atol=1e-5, rtol=1e-5)
    post = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(32, 4, batch_first=True), 1)
    with pytest.raises(ValueError, match="norm_first=True"):
        decode(post, tgt, mem, m)
