"""Flow-matching head (rectified flow): x_tau = (1 - tau) * noise + tau * actions, the network predicts the
velocity (actions - noise); sampling integrates from tau = 0 (noise) to 1 with Euler steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sensorvla.config import HeadConfig
from sensorvla.models.heads.base import ActionHead, ChunkDenoiser, masked_mean

TIME_SCALE = 1000.0  # tau in [0, 1] is embedded like a diffusion timestep in [0, 1000]


class FlowHead(ActionHead):
    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__(cfg, cond_dim)
        self.velocity = ChunkDenoiser(cfg, cond_dim)

    def loss(self, cond, cond_mask, actions, action_mask):
        b = actions.shape[0]
        noise = torch.randn_like(actions)
        # tau ~ Beta(1.5, 1) skews towards the data end, as in pi0; both ends are still covered
        tau = torch.distributions.Beta(1.5, 1.0).sample((b,)).to(actions.device)
        x = (1 - tau)[:, None, None] * noise + tau[:, None, None] * actions
        pred = self.velocity(x, tau * TIME_SCALE, cond, cond_mask)
        return masked_mean(F.mse_loss(pred, actions - noise, reduction="none"), action_mask)

    @torch.no_grad()
    def sample(self, cond, cond_mask, generator=None, num_steps=None):
        b = cond.shape[0]
        steps = num_steps or self.cfg.num_inference_steps
        x = torch.randn(
            (b, self.horizon, self.action_dim),
            generator=generator,
            device=generator.device if generator else cond.device,
        ).to(cond.device, cond.dtype)
        dt = 1.0 / steps
        for i in range(steps):
            tau = torch.full((b,), i * dt, device=cond.device)
            x = x + dt * self.velocity(x, tau * TIME_SCALE, cond, cond_mask)
        return x
