"""Measured peak memory of real training steps, to check the planner against (`sensorvla plan --measure`).

The measured quantity is the steady-state step peak: the most tensor memory allocated at any moment after the
first optimizer step (so weights, gradients and AdamW states all exist, and one-off loading temporaries are
excluded), through the following steps, validation and checkpointing of `train(cfg)`.
- CUDA: `torch.cuda.max_memory_allocated`, reset by a global optimizer-step hook after the first step.
- CPU: at the end of the first step the hook sums the storages of every live tensor (found through the garbage
  collector: weights, gradients, AdamW states, the batch), less those that were alive before `train` started
  (what earlier runs in the same process left behind: a compiled graph's constants, caches), and drops a
  marker into a `torch.profiler` timeline recorded with `profile_memory=True`; the profiler then sees every
  later allocation and free of the training thread at the allocator (kernel workspaces included), and the
  peak is that sum plus the running total's highest point after the marker. The profiler alone cannot give
  the sum: it does not see allocations made on other threads, e.g. transformers' parallel weight loading.
  RSS would not do either: glibc keeps freed pages, so RSS shows the process's high-water mark, loading
  included, not the live tensors.
"""

from __future__ import annotations

import copy
import gc

import torch

MARKER = "sensorvla.plan.measure.after_first_step"


def _train(cfg) -> None:
    from sensorvla.training.loop import train

    train(cfg, progress=False)


def measure_step_peak(cfg, device: str = "cpu") -> int:
    """Run `train(cfg)` (it should stop after a few steps: --train.max-steps >= 2) and return the step peak in bytes."""
    cfg = copy.deepcopy(cfg)
    cfg.train.device = device
    if device == "cpu" and cfg.data.num_workers < 0:  # batches in host memory: the planner models one, not the
        cfg.data.num_workers = 0  # loader workers' prefetched ones (on CUDA the host's batches do not count)
    if cfg.train.max_steps < 2:
        raise ValueError("measure the step peak with --train.max-steps >= 2 (the first step only allocates states)")
    gc.collect()
    state = {"steps": 0, "before": 0 if device == "cuda" else live_tensor_bytes("cpu")}

    def after_step(optimizer, args, kwargs) -> None:
        state["steps"] += 1
        if state["steps"] == 1:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                state["baseline"] = live_tensor_bytes("cpu") - state["before"]
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
        return state["baseline"] + _cpu_rise_after_marker(prof)
    finally:
        handle.remove()


def live_tensor_bytes(device_type: str = "cpu") -> int:
    """Bytes of all live tensors' storages on `device_type`, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != device_type or obj.is_sparse:
                continue
            st = obj.untyped_storage()
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
    return total


def _cpu_rise_after_marker(prof) -> int:
    """Highest point of the allocator's running total after the marker, relative to its value at the marker."""
    events = prof.profiler.kineto_results.events()
    marks = [e.start_ns() for e in events if e.name() == MARKER]
    if not marks:
        raise RuntimeError("no optimizer step ran: raise --train.max-steps or the dataset size")
    start = min(marks)
    mem = sorted(
        (e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
        key=lambda e: e.start_ns(),
    )
    live, at_mark, rise = 0, None, 0
    for e in mem:
        if at_mark is None and e.start_ns() >= start:
            at_mark = live
        live += e.nbytes()
        if at_mark is not None:
            rise = max(rise, live - at_mark)
    return rise
