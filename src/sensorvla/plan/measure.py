"""Measured peak memory of real training steps, to check the planner against (`sensorvla plan --measure`).

The measured quantity is the steady-state step peak: the most tensor memory allocated at any moment after the
first optimizer step (so weights, gradients and AdamW states all exist, and one-off loading temporaries are
excluded), through the following steps, validation and checkpointing of `train(cfg)`.
- CUDA: `torch.cuda.max_memory_allocated`, reset by a global optimizer-step hook after the first step.
- CPU: the allocator's own accounting: `torch.profiler` with `profile_memory=True` records every CPU allocation
  and free (kernel workspaces included); the hook drops a marker into the same timeline and the peak of the
  running total is taken after it. RSS would not do: glibc keeps freed pages, so it shows the high-water mark
  of the process, loading included, not the live tensors.
"""

from __future__ import annotations

import copy

import torch

MARKER = "sensorvla.plan.measure.after_first_step"


def _train(cfg) -> None:
    from sensorvla.training.loop import train

    train(cfg, progress=False)


def measure_step_peak(cfg, device: str = "cpu") -> int:
    """Run `train(cfg)` (it should stop after a few steps: --train.max-steps >= 2) and return the step peak in bytes."""
    cfg = copy.deepcopy(cfg)
    cfg.train.device = device
    if cfg.train.max_steps < 2:
        raise ValueError("measure the step peak with --train.max-steps >= 2 (the first step only allocates states)")
    state = {"steps": 0}

    def after_step(optimizer, args, kwargs) -> None:
        state["steps"] += 1
        if state["steps"] == 1:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                with torch.profiler.record_function(MARKER):
                    pass

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(after_step)
    try:
        if device == "cuda":
            _train(cfg)
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _train(cfg)
        return _cpu_peak_after_marker(prof)
    finally:
        handle.remove()


def _cpu_peak_after_marker(prof) -> int:
    events = prof.profiler.kineto_results.events()
    marks = [e.start_ns() for e in events if e.name() == MARKER]
    if not marks:
        raise RuntimeError("no optimizer step ran: raise --train.max-steps or the dataset size")
    start = min(marks)
    mem = sorted(
        (e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in mem:
        live += e.nbytes()
        if e.start_ns() >= start:
            peak = max(peak, live)
    return peak
