"""Flow-matching head in pi0's convention: t = 1 is pure noise, t = 0 is the action chunk.

Training, as openpi's `models/pi0.py` `compute_loss` (pi0, Black et al. 2024, emphasises the noisier
timesteps; openpi's code writes that with t = 1 as noise):
    x_t = t * noise + (1 - t) * actions,   target velocity u = noise - actions,
    t = 0.001 + 0.999 * s,  s ~ Beta(1.5, 1)  (density ~ sqrt(s): the emphasis is at the NOISY end, t -> 1).
Sampling integrates dx/dt = v(x_t, t) from t = 1 (noise) to t = 0 with Euler steps of dt = -1/steps.
`--model.head.noise-scale` (default 1) scales the initial noise: below 1 the samples move towards the
mode of the learned distribution (a sampling temperature; 0 integrates the ODE from its centre). Where
demonstrations are unimodal and precision matters more than diversity, a low value helps; see
docs/decisions.md ("Flow head").
Beta(1.5, 1) has the CDF s^1.5, so s = U^(2/3) with U ~ Uniform(0, 1): an explicit `torch.Generator`
can draw it (validation uses its own generator). See docs/decisions.md ("Flow head").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sensorvla.config import HeadConfig
from sensorvla.models.heads.base import DenoisingHead, masked_mean
from sensorvla.models.heads.denoisers import build_denoiser

TIME_SCALE = 1000.0  # t in [0, 1] is embedded like a diffusion timestep in [0, 1000]
BETA_ALPHA = 1.5  # s ~ Beta(BETA_ALPHA, 1)
T_MIN = 0.001  # t never reaches exactly 0 (pi0: beta * 0.999 + 0.001)


def sample_time(b: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(b,) flow times in (0.001, 1]; t = 1 is noise. Density rises towards the noisy end (pi0)."""
    dev = generator.device if generator is not None else device
    u = torch.rand((b,), generator=generator, device=dev)
    s = u.pow(1.0 / BETA_ALPHA)  # inverse CDF of Beta(1.5, 1)
    return (T_MIN + (1.0 - T_MIN) * s).to(device)


class FlowHead(DenoisingHead):
    """Flow-matching action chunk head: learns the velocity from noise to actions, Euler-integrated at sampling."""

    net_attr = "velocity"

    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__(cfg, cond_dim)
        self.velocity = build_denoiser(cfg, cond_dim)

    def loss(self, cond, cond_mask, actions, action_mask, generator=None):
        """Per-sample velocity-regression loss (B,) at random times, masked over the horizon."""
        b = actions.shape[0]
        dev = generator.device if generator is not None else actions.device
        noise = torch.randn(actions.shape, generator=generator, device=dev).to(actions.device, actions.dtype)
        t = sample_time(b, generator, device=actions.device)
        x_t = t[:, None, None] * noise + (1 - t)[:, None, None] * actions
        pred = self.velocity(x_t, t * TIME_SCALE, cond, cond_mask)
        return masked_mean(F.mse_loss(pred, noise - actions, reduction="none"), action_mask)

    def step_times(self, num_steps: int | None, device) -> torch.Tensor:
        """The Euler steps' times t = 1, 1 - dt, ... (scaled by TIME_SCALE), (S,)."""
        steps = num_steps or self.cfg.num_inference_steps
        dt = -1.0 / steps
        return torch.tensor([1.0 + i * dt for i in range(steps)], device=device) * TIME_SCALE

    def integrate(self, velocity_fn, x: torch.Tensor, num_steps) -> torch.Tensor:
        """Euler steps of dt = -1/steps from the noise x (scaled by `noise_scale`); `velocity_fn(x, i, t)` is step
        i's v."""
        steps = num_steps or self.cfg.num_inference_steps
        x = x * self.cfg.noise_scale
        dt = -1.0 / steps
        for i, t in enumerate(self.step_times(steps, x.device)):
            x = x + dt * velocity_fn(x, i, t)
        return x
