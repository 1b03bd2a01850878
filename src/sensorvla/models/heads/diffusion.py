"""Diffusion head: DDPM training (epsilon prediction, cosine schedule) and DDIM sampling, with the
schedulers from diffusers. `--diffusion_timesteps` (default 100) and DDIM steps (default 10) are config."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sensorvla.config import HeadConfig
from sensorvla.models.heads.base import DenoisingHead, masked_mean
from sensorvla.models.heads.denoisers import build_denoiser


class DDIMSchedule(NamedTuple):
    """DDIM sampling constants for one step count: timesteps (S,) long, alpha_prod / alpha_prod_prev (S,)."""

    timesteps: torch.Tensor
    alpha_prod: torch.Tensor
    alpha_prod_prev: torch.Tensor


class DiffusionHead(DenoisingHead):
    """DDPM-trained, DDIM-sampled action chunk denoiser (predicts the noise)."""

    def __init__(self, cfg: HeadConfig, cond_dim: int):
        super().__init__(cfg, cond_dim)
        from diffusers import DDIMScheduler, DDPMScheduler

        self.denoiser = build_denoiser(cfg, cond_dim)
        common = dict(
            num_train_timesteps=cfg.diffusion_timesteps,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="epsilon",
            clip_sample=False,
        )
        self.train_scheduler = DDPMScheduler(**common)
        # "trailing" spacing starts sampling at t = T - 1 (the original started at t = 90 of 100)
        self.sample_scheduler = DDIMScheduler(**common, timestep_spacing="trailing", set_alpha_to_one=True)
        self._ddim_schedules: dict[int, DDIMSchedule] = {}

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

    def ddim_schedule(self, num_steps: int) -> DDIMSchedule:
        """The DDIM (eta = 0) timesteps and coefficients for `num_steps`, computed once per step count.

        `set_timesteps` mutates a scheduler, so it runs on a private copy: concurrent sampling calls (two
        runners, background threads) never share schedule state; the cached result is immutable.
        """
        cached = self._ddim_schedules.get(num_steps)
        if cached is not None:
            return cached
        sched = copy.deepcopy(self.sample_scheduler)
        sched.set_timesteps(num_steps)
        timesteps = sched.timesteps.clone()
        alphas, prevs = [], []
        for t in timesteps.tolist():  # DDIMScheduler.step's prev_timestep and alpha_prod_t(_prev)
            prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
            alphas.append(sched.alphas_cumprod[t])
            prevs.append(sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod)
        schedule = DDIMSchedule(timesteps, torch.stack(alphas), torch.stack(prevs))
        self._ddim_schedules[num_steps] = schedule
        return schedule

    def step_times(self, num_steps: int | None, device) -> torch.Tensor:
        """The DDIM timesteps (S,) long, from T - 1 down."""
        return self.ddim_schedule(num_steps or self.cfg.num_inference_steps).timesteps.to(device)

    def integrate(self, eps_fn, b: int, like: torch.Tensor, generator, num_steps) -> torch.Tensor:
        """The DDIM (eta = 0) loop from noise drawn with `generator`; `eps_fn(x, i, t)` predicts step i's noise."""
        shape = (b, self.horizon, self.action_dim)
        x = torch.randn(shape, generator=generator, device=generator.device if generator else like.device)
        x = x.to(like.device, like.dtype)
        schedule = self.ddim_schedule(num_steps or self.cfg.num_inference_steps)
        timesteps = schedule.timesteps.to(like.device)
        for i, (a_t, a_prev) in enumerate(zip(schedule.alpha_prod.tolist(), schedule.alpha_prod_prev.tolist())):
            eps = eps_fn(x, i, timesteps[i])
            # DDIMScheduler.step with eta = 0 and epsilon prediction, on precomputed scalars
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x
