"""Diffusion head: DDPM training (epsilon prediction, cosine schedule) and DDIM sampling, with the
schedulers from diffusers. `--diffusion_timesteps` (default 100) and DDIM steps (default 10) are config."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from sensorvla.config import HeadConfig
from sensorvla.models.heads.base import DenoisingHead, masked_mean
from sensorvla.models.heads.denoisers import build_denoiser


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
        self._ddim_schedulers: dict[int, DDIMScheduler] = {}
        # their timesteps as ints, read when a scheduler is made (a traced graph sees its tensors as constants)
        self._ddim_steps: dict[int, list[int]] = {}

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

    def ddim_scheduler(self, num_steps: int):
        """diffusers' `DDIMScheduler` set to `num_steps`, one per step count (`set_timesteps` mutates a scheduler:
        each count gets a private copy, so concurrent sampling calls never share schedule state; `step` only reads
        it). Its alphas are float64, so the step's coefficients are computed in float64 and then applied in the
        sample's dtype (tests/models/test_diffusion_head.py: bit-equal to the re-derived update it replaced)."""
        sched = self._ddim_schedulers.get(num_steps)
        if sched is None:
            sched = copy.deepcopy(self.sample_scheduler)
            sched.set_timesteps(num_steps)
            sched.alphas_cumprod = sched.alphas_cumprod.double()
            sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
            self._ddim_schedulers[num_steps] = sched
            self._ddim_steps[num_steps] = sched.timesteps.tolist()
        return sched

    def step_times(self, num_steps: int | None, device) -> torch.Tensor:
        """The DDIM timesteps (S,) long, from T - 1 down."""
        return self.ddim_scheduler(num_steps or self.cfg.num_inference_steps).timesteps.to(device)

    def integrate(self, eps_fn, x: torch.Tensor, num_steps) -> torch.Tensor:
        """The DDIM (eta = 0) loop from the noise x; `eps_fn(x, i, t)` predicts step i's noise."""
        steps = num_steps or self.cfg.num_inference_steps
        sched = self.ddim_scheduler(steps)
        timesteps = sched.timesteps.to(x.device)
        for i, t in enumerate(self._ddim_steps[steps]):
            x = sched.step(eps_fn(x, i, timesteps[i]), t, x).prev_sample
        return x
