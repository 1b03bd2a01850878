"""`--model.head.denoiser mlp` (`PlanDenoiser`): its sampling path (plan decoded once per call, one MLP-Mixer
block per step) equals its training forward, sampling reads the conditioning once, and a sampling head with it
learns (the loss falls when it overfits two batches)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from sensorvla.config import HeadConfig
from sensorvla.models.heads import build_head
from sensorvla.models.heads.denoisers import ChunkDenoiser, PlanDenoiser, build_denoiser
from sensorvla.models.heads.flow import TIME_SCALE

B, N_C, COND_DIM, H, D_A = 3, 11, 24, 6, 4


def make(kind: str, steps: int, denoiser: str = "mlp", **kw):
    torch.manual_seed(0)
    cfg = HeadConfig(
        type=kind, horizon=H, action_dim=D_A, hidden_dim=32, num_heads=4, num_inference_steps=steps, denoiser=denoiser
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return build_head(cfg, COND_DIM).eval()


def cond(padded: bool):
    g = torch.Generator().manual_seed(1)
    c, m = torch.randn(B, N_C, COND_DIM, generator=g), torch.ones(B, N_C, dtype=torch.bool)
    if padded:
        m[1, 4:] = False
        c[1, 4:] = 1e4
    return c, m


def test_the_option_builds_the_named_network():
    assert isinstance(make("diffusion", 4, "decoder").denoiser, ChunkDenoiser)
    assert isinstance(make("flow", 4, "mlp").velocity, PlanDenoiser)
    with pytest.raises(ValueError, match="--model.head.denoiser"):
        build_denoiser(HeadConfig(horizon=H, action_dim=D_A, denoiser="unet"), COND_DIM)  # type: ignore[arg-type]


@pytest.mark.parametrize("padded", [False, True])
def test_plan_step_equals_forward(padded):
    den = make("diffusion", 10).denoiser
    c, m = cond(padded)
    x = torch.randn(B, H, D_A, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = den.context(den.memory(c, m))
        torch.testing.assert_close(z, den.plan(c, m), atol=1e-5, rtol=1e-5)
        for ti in torch.tensor([99, 57, 3]):
            (emb,) = den.step_embeddings(ti.view(1))
            torch.testing.assert_close(den.step(x, emb, z), den(x, ti.expand(B), c, m), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_mlp_sampling_equals_the_per_step_forward(padded):
    c, m = cond(padded)
    flow = make("flow", 5)
    got = flow.sample(c, m, generator=torch.Generator().manual_seed(0))
    x = torch.randn(B, H, D_A, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(5):
            x = x + (-1 / 5) * flow.velocity(x, torch.full((B,), 1.0 - i / 5) * TIME_SCALE, c, m)
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)

    diff = make("diffusion", 4)
    got = diff.sample(c, m, generator=torch.Generator().manual_seed(0))
    sched = DDIMScheduler.from_config(diff.sample_scheduler.config)
    sched.set_timesteps(4)
    x = torch.randn(B, H, D_A, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(diff.denoiser(x, t.expand(B), c, m), t, x, eta=0.0).prev_sample
    assert (got - x).abs().max() <= 1e-5 * x.abs().max()


def test_the_plan_is_decoded_once_per_sampling_call():
    head = make("diffusion", 10)
    calls = []
    head.denoiser.cond_proj.register_forward_hook(lambda *a: calls.append("cond"))
    head.denoiser.out.register_forward_hook(lambda *a: calls.append("step"))
    head.sample(*cond(False), generator=torch.Generator().manual_seed(0))
    assert calls == ["cond"] + ["step"] * 10


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_a_sampling_head_with_the_mlp_denoiser_learns(kind):
    head = make(kind, 5).train()
    c, m = cond(False)
    g = torch.Generator().manual_seed(5)
    actions = torch.randn(B, H, D_A, generator=g).cumsum(1) * 0.3  # a chunk that depends on the sample
    amask = torch.ones(B, H, dtype=torch.bool)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(head.loss(c, m, actions, amask, torch.Generator().manual_seed(9)).mean())

    before = eval_loss()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(150):
        loss = head.loss(c, m, actions, amask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before


def test_a_checkpoint_saved_before_the_option_loads_with_the_decoder(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """config.json files written before `denoiser` existed have no such key: they mean the decoder denoiser
    (config.LEGACY_VALUES), so they load strictly and sample as they did; new configs default to mlp."""
    import json

    from sensorvla.config import SensorVLAConfig, resolve_from_meta
    from sensorvla.data.format import load_meta
    from sensorvla.data.normalize import compute_stats
    from sensorvla.models.folder import save_pretrained
    from sensorvla.models.policy import build_policy, load_pretrained

    assert SensorVLAConfig().model.head.denoiser == "mlp"
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.model.head.type, cfg.model.head.denoiser, cfg.model.head.num_inference_steps = "flow", "decoder", 3
    cfg.data.dataset_dir = str(synth_dataset_dir)
    cfg = resolve_from_meta(cfg, load_meta(synth_dataset_dir))
    torch.manual_seed(0)
    policy = build_policy(cfg).eval()
    out = save_pretrained(policy, tmp_path / "old", cfg, compute_stats(synth_dataset_dir, progress=False))
    saved = json.loads((out / "config.json").read_text())
    del saved["model"]["head"]["denoiser"]  # as an older sensorvla wrote it
    (out / "config.json").write_text(json.dumps(saved))
    from sensorvla.integrity import write_manifest

    write_manifest(out)  # the manifest records the folder as edited (else the changed config.json is refused)
    loaded, loaded_cfg, _ = load_pretrained(out)
    assert loaded_cfg.model.head.denoiser == "decoder" and isinstance(loaded.head.velocity, ChunkDenoiser)
    c = torch.randn(2, 9, loaded.fusion.out_dim)
    m = torch.ones(2, 9, dtype=torch.bool)
    a = policy.head.sample(c, m, generator=torch.Generator().manual_seed(0))
    b = loaded.eval().head.sample(c, m, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
