"""The flow head follows pi0's convention (t = 1 is noise) with the timestep density emphasising the noisy
end; sampling integrates from noise (t = 1) to data (t = 0); the loss noise obeys a given generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sensorvla.config import HeadConfig
from sensorvla.models.heads.flow import TIME_SCALE, FlowHead, sample_time

H, D = 16, 32  # many elements per chunk: a chunk's std tells its noise share


def head() -> FlowHead:
    torch.manual_seed(0)
    return FlowHead(HeadConfig(type="flow", horizon=H, action_dim=D, hidden_dim=32, num_heads=2), cond_dim=32)


def cond(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(b, 3, 32), torch.ones(b, 3, dtype=torch.bool)


def test_noise_share_density_emphasises_the_noisy_end():
    """Run the real loss on all-zero actions: x_t = t * noise, so each chunk's std is its noise share,
    and the network is fed t * TIME_SCALE. pi0: share = 0.001 + 0.999 * Beta(1.5, 1) (mean 0.6)."""
    fh = head()
    seen = {}

    def spy(x, t, c, m):
        seen["x"], seen["t"] = x.detach(), t.detach() / TIME_SCALE
        return torch.zeros_like(x)

    fh.velocity.forward = spy
    b = 4000
    actions, mask = torch.zeros(b, H, D), torch.ones(b, H, dtype=torch.bool)
    fh.loss(*cond(b), actions, mask, generator=torch.Generator().manual_seed(1))
    share = seen["x"].flatten(1).std(dim=1)
    np.testing.assert_allclose(
        share.numpy(), seen["t"].numpy(), rtol=0.2, atol=0.01
    )  # x_t = t * noise (std of 512 normals: +-3%)
    t = seen["t"].numpy()
    assert t.min() >= 0.001 and t.max() <= 1.0
    assert abs(t.mean() - (0.001 + 0.999 * 0.6)) < 0.015  # Beta(1.5, 1) mean 0.6; the reversed density gives 0.4
    s = (t - 0.001) / 0.999
    for q in (0.25, 0.5, 0.75):  # the Beta(1.5, 1) CDF is q^1.5
        assert abs((s <= q).mean() - q**1.5) < 0.03, q
    assert (t > 0.5).mean() > 0.6  # most draws are mostly noise


def test_target_is_noise_minus_actions():
    fh = head()
    seen = {}
    fh.velocity.forward = lambda x, t, c, m: seen.setdefault("x", x.detach()) * 0
    actions = torch.randn(8, H, D)
    g = torch.Generator().manual_seed(3)
    loss = fh.loss(*cond(8), actions, torch.ones(8, H, dtype=torch.bool), generator=g)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(actions.shape, generator=g)
    t = sample_time(8, g)
    torch.testing.assert_close(seen["x"], t[:, None, None] * noise + (1 - t)[:, None, None] * actions)
    # a zero velocity prediction costs |noise - actions|^2 per element
    torch.testing.assert_close(loss, ((noise - actions) ** 2).mean((1, 2)))


def test_sampling_runs_from_noise_at_t1_to_data_at_t0():
    """With the exact velocity of a point mass at a (v = (x_t - a) / t), Euler from t = 1 lands on a."""
    fh = head()
    a = torch.linspace(-1, 1, H * D).reshape(1, H, D)
    times = []

    def exact(x, t, c, m):
        tt = (t / TIME_SCALE)[:, None, None]
        times.append(float(tt.flatten()[0]))
        return (x - a) / tt

    fh.velocity.forward = exact
    fh.velocity.uses_step_path = lambda: False  # the per-step forward (the step path equals it: test_heads_cached.py)
    out = fh.sample(*cond(1), generator=torch.Generator().manual_seed(0), num_steps=5)
    assert times == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    torch.testing.assert_close(out, a, atol=1e-5, rtol=1e-5)


def test_loss_noise_follows_the_generator_and_leaves_the_global_rng():
    fh = head()
    args = (*cond(4), torch.randn(4, H, D), torch.ones(4, H, dtype=torch.bool))
    before = torch.get_rng_state()
    a = fh.loss(*args, generator=torch.Generator().manual_seed(5))
    b = fh.loss(*args, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)  # a given generator never touches the global stream
    assert torch.equal(a, b)
    assert not torch.equal(a, fh.loss(*args, generator=torch.Generator().manual_seed(6)))
    assert math.isfinite(float(a.detach().mean()))


def test_noise_scale_scales_the_initial_noise_and_zero_is_deterministic():
    """noise_scale multiplies the starting noise: 0 starts every sample at the centre (the same chunk for any
    seed), 1 keeps the learned distribution's spread, and samples in between lie between them."""
    starts = []
    fh = head()
    fh.velocity.forward = lambda x, t, c, m: (starts.append(x.clone()) if float(t[0]) == TIME_SCALE else None) or 0 * x
    fh.velocity.uses_step_path = lambda: False
    outs = {}
    for scale in (0.0, 0.5, 1.0):
        fh.cfg.noise_scale = scale
        outs[scale] = [fh.sample(*cond(2), generator=torch.Generator().manual_seed(s), num_steps=3) for s in (0, 1)]
    assert torch.equal(outs[0.0][0], outs[0.0][1]) and not outs[0.0][0].any()
    assert not torch.equal(outs[1.0][0], outs[1.0][1])
    torch.testing.assert_close(outs[0.5][0], 0.5 * outs[1.0][0])  # the same seed, half the spread
    assert len(starts) == 6


def test_noise_scale_is_validated():
    from sensorvla.config import ConfigError, SensorVLAConfig

    cfg = SensorVLAConfig()
    cfg.model.head.noise_scale = 0.5
    with pytest.raises(ConfigError, match="flow head only"):
        cfg.validate()  # the default regression head
    cfg.model.head.type = "flow"
    cfg.validate()
    cfg.model.head.noise_scale = 1.5
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        cfg.validate()
