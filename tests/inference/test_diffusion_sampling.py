"""Diffusion sampling keeps no shared schedule state: concurrent or nested calls equal serial ones, and the
results equal the original shared-scheduler algorithm for a fixed seed."""

from __future__ import annotations

import threading

import torch
from diffusers import DDIMScheduler

from sensorvla.config import HeadConfig
from sensorvla.models.heads.diffusion import DiffusionHead

COND_DIM = 16


def make_head() -> DiffusionHead:
    torch.manual_seed(0)
    head = DiffusionHead(
        HeadConfig(type="diffusion", horizon=6, action_dim=3, hidden_dim=32, num_inference_steps=10), COND_DIM
    )
    return head.eval()


def cond(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, COND_DIM, generator=g), torch.ones(2, 5, dtype=torch.bool)


def sample(head, steps, seed=0, c=None):
    c = c or cond()
    return head.sample(*c, generator=torch.Generator().manual_seed(seed), num_steps=steps)


@torch.no_grad()
def reference_sample(head, steps, seed=0):
    """The original algorithm: one DDIM scheduler, set_timesteps, then step() over its timesteps."""
    c, m = cond()
    sched = DDIMScheduler.from_config(head.sample_scheduler.config)
    x = torch.randn((2, head.horizon, head.action_dim), generator=torch.Generator().manual_seed(seed))
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        eps = head.denoiser(x, t.expand(2), c, m)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x


def test_results_equal_the_original_algorithm_for_a_fixed_seed():
    """Equal to float rounding: sampling reuses the per-call conditioning (models/heads/base.py). An untrained
    denoiser's DDIM samples reach ~1e3 (x0 = (x - sqrt(1 - a) eps) / sqrt(a) with a ~ 1e-4 at t = T - 1), so the
    tolerance is 1e-6 of the sample's scale."""
    head = make_head()
    for steps in (10, 4):
        got, want = sample(head, steps), reference_sample(head, steps)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), steps


def test_a_sampling_call_inside_another_does_not_change_it():
    """Interleaving made deterministic: a second sampler runs in the middle of the first one's loop (what a
    second runner thread sharing the policy does). With one shared scheduler, its set_timesteps(3)
    changes the step size the first loop uses."""
    head = make_head()
    serial_10, serial_3 = sample(head, 10), sample(head, 3)
    nested: list[torch.Tensor] = []
    started = []

    def hook(module, args, output):
        if not started:  # once, at the first denoiser call of the outer loop
            started.append(True)
            nested.append(sample(head, 3, c=cond()))
        return output

    handle = head.denoiser.out.register_forward_hook(hook)  # the output layer runs once per denoising step
    try:
        outer = sample(head, 10)
    finally:
        handle.remove()
    assert torch.equal(nested[0], serial_3)
    assert torch.equal(outer, serial_10)


def test_two_threads_sharing_one_head_get_their_serial_results():
    head = make_head()
    want = {steps: sample(head, steps, seed=steps) for steps in (2, 7, 10)}
    got: dict[int, list[torch.Tensor]] = {s: [] for s in want}
    barrier = threading.Barrier(len(want))

    def work(steps: int) -> None:
        barrier.wait(timeout=30)
        for _ in range(5):
            got[steps].append(sample(head, steps, seed=steps))

    threads = [threading.Thread(target=work, args=(s,)) for s in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for steps, outs in got.items():
        assert len(outs) == 5 and all(torch.equal(o, want[steps]) for o in outs), steps
