"""Diffusion head: DDPM training (epsilon prediction, cosine schedule) and DDIM sampling, with the
schedulers from diffusers. `--diffusion_timesteps` (default 100) and DDIM steps (default 10) are config."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from sensorvla.config import HeadConfig
from sensorvla.models.heads.base import ActionHead, ChunkDenoiser, masked_mean


class DiffusionHead(ActionHead):
    """DDPM-trained, DDIM-sampled action chunk denoiser (predicts the noise)."""

    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__(cfg, cond_dim)
        from diffusers import DDIMScheduler, DDPMScheduler

        self.denoiser = ChunkDenoiser(cfg, cond_dim)
        common = dict(
            num_train_timesteps=cfg.diffusion_timesteps,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="epsilon",
            clip_sample=False,
        )
        self.train_scheduler = DDPMScheduler(**common)
        # "trailing" spacing starts sampling at t = T - 1 (the original started at t = 90 of 100)
        self.sample_scheduler = DDIMScheduler(**common, timestep_spacing="trailing", set_alpha_to_one=True)

    def loss(self, cond, cond_mask, actions, action_mask, generator=None):
        """Per-sample noise-prediction loss (B,) at random timesteps, masked over the horizon."""
        b = actions.shape[0]
        dev = generator.device if generator is not None else actions.device
        noise = torch.randn(actions.shape, generator=generator, device=dev).to(actions.device, actions.dtype)
        t = torch.randint(0, self.cfg.diffusion_timesteps, (b,), generator=generator, device=dev).to(actions.device)
        self.train_scheduler.alphas_cumprod = self.train_scheduler.alphas_cumprod.to(actions.device)
        noisy = self.train_scheduler.add_noise(actions, noise, t)
        pred = self.denoiser(noisy, t, cond, cond_mask)
        return masked_mean(F.mse_loss(pred, noise, reduction="none"), action_mask)

    @torch.no_grad()
    def sample(self, cond, cond_mask, generator=None, num_steps=None):
        """DDIM sampling from noise: cond (B, N_c, D) -> actions (B, H, D_a); `num_steps` overrides the config."""
        b = cond.shape[0]
        shape = (b, self.horizon, self.action_dim)
        x = torch.randn(shape, generator=generator, device=generator.device if generator else cond.device)
        x = x.to(cond.device, cond.dtype)
        # set_timesteps mutates the scheduler (timesteps, num_inference_steps that step() reads): a per-call
        # copy keeps concurrent sampling calls (two runners, background threads) from racing on it
        sched = copy.deepcopy(self.sample_scheduler)
        sched.set_timesteps(num_steps or self.cfg.num_inference_steps, device=cond.device)
        for t in sched.timesteps:
            eps = self.denoiser(x, t.expand(b).to(cond.device), cond, cond_mask)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x
