"""Process runtime settings: torch's intra-op thread count, chosen deliberately and printed at start, and the
optional `torch.compile` of the sensor encoder and action head (`--runtime.compile`).

torch's default (one thread per logical CPU, in every process) oversubscribes a shared or multi-process
machine: on a busy 2-core box the demo ran more than 5x slower than with one thread (docs/runtime.md).
`configure_threads()` picks, in order: `OMP_NUM_THREADS` when set; 1 per process under torchrun on CPU;
the physical cores (of this process's CPU affinity) shared by the local processes otherwise.
It also makes idle OpenMP threads sleep instead of spin (`OMP_WAIT_POLICY=PASSIVE`, unless the environment sets
a policy): on a loaded 2-core machine the spin-wait burned ~30x the CPU per training step (docs/runtime.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "OMP_NUM_THREADS"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


@dataclass(frozen=True)
class ThreadSetting:
    """The intra-op thread count applied to torch and why it was chosen."""

    threads: int
    reason: str
    wait_policy: str = ""  # what `passive_wait_policy` reported ("" = not applied)

    def describe(self) -> str:
        """One line for the log: the thread count and why, and the OpenMP wait policy when it was applied."""
        line = f"torch intra-op threads: {self.threads} ({self.reason})"
        return f"{line}; {self.wait_policy}" if self.wait_policy else line


def passive_wait_policy(env=None, torch_loaded: bool | None = None) -> str:
    """Make idle OpenMP threads sleep: set `OMP_WAIT_POLICY=PASSIVE` in `env` (default `os.environ`, so spawned
    workers inherit it) unless a policy is already set. OpenMP reads it once, when torch loads it, so call this
    before importing torch. Returns one line for the log (it says when it came too late for this process)."""
    env = os.environ if env is None else env
    raw = env.get(WAIT_POLICY_ENV, "").strip()
    if raw:
        return f"idle OpenMP threads: {WAIT_POLICY_ENV}={raw} (from the environment)"
    env[WAIT_POLICY_ENV] = "PASSIVE"
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    if torch_loaded:  # libgomp has read the environment already: only child processes get it
        return (
            f"idle OpenMP threads: {WAIT_POLICY_ENV}=PASSIVE for child processes only (torch was imported first; "
            f"export {WAIT_POLICY_ENV}=PASSIVE before starting Python)"
        )
    return f"idle OpenMP threads: passive ({WAIT_POLICY_ENV}=PASSIVE; export {WAIT_POLICY_ENV}=ACTIVE to spin)"


def physical_cores(cpus: set[int] | None = None, sysfs: str | Path = "/sys/devices/system/cpu") -> int:
    """Distinct physical cores among `cpus` (default: this process's CPU affinity); SMT siblings count once."""
    if cpus is None:
        cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(sysfs) / f"cpu{cpu}" / "topology"
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))  # no topology (non-Linux, containers without sysfs): logical CPUs
        cores.add((package, core))
    return max(1, len(cores))


def choose_threads(
    env: dict[str, str] | None = None, *, cuda: bool | None = None, cores: int | None = None
) -> ThreadSetting:
    """The thread count `configure_threads` applies, without applying it (pure; for tests and `plan`)."""
    env = dict(os.environ if env is None else env)
    raw = env.get(THREADS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n > 0:
            return ThreadSetting(n, f"{THREADS_ENV}={raw}")
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or 1)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if local_world > 1 and not cuda:
        return ThreadSetting(1, f"1 per process: {local_world} torchrun processes on CPU; set {THREADS_ENV} to change")
    cores = physical_cores() if cores is None else cores
    if local_world > 1:
        n = max(1, cores // local_world)
        return ThreadSetting(n, f"{cores} physical cores / {local_world} local processes; set {THREADS_ENV} to change")
    return ThreadSetting(cores, f"physical cores; set {THREADS_ENV} to change")


AUTO_LOADER_WORKERS = 2  # openpi's default DataLoader workers (LeRobot's is 4)


def loader_workers(requested: int, in_memory: bool, env: dict[str, str] | None = None, cores: int | None = None) -> int:
    """DataLoader workers for `--data.num-workers`: the value when >= 0; -1 (auto) gives 0 when the samples are
    already in memory (preloaded: nothing to decode), else min(AUTO_LOADER_WORKERS, this process's share of the
    physical cores), at least 1."""
    if requested >= 0:
        return requested
    if in_memory:
        return 0
    env = dict(os.environ if env is None else env)
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or 1)
    cores = physical_cores() if cores is None else cores
    return max(1, min(AUTO_LOADER_WORKERS, cores // max(local_world, 1)))


def configure_threads(verbose: bool = True) -> ThreadSetting:
    """Make idle OpenMP threads passive (`passive_wait_policy`, before torch is imported), apply `choose_threads()`
    to torch (`torch.set_num_threads`) and print both once on local rank 0."""
    wait = passive_wait_policy()
    import torch

    setting = dataclasses.replace(choose_threads(), wait_policy=wait)
    torch.set_num_threads(setting.threads)
    if verbose and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"[sensorvla] {setting.describe()}", file=sys.stderr, flush=True)
    return setting


def cpu_seconds() -> float:
    """CPU-seconds (user + system) used so far by this process (every thread) and its reaped children (DataLoader
    workers once joined, finished subprocesses): what a training budget in CPU-seconds counts."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bf16_autocast(device):
    """bf16 autocast on a CUDA device that supports it; a no-op context elsewhere (CPU bf16 autocast is slower)."""
    import contextlib

    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_policy(policy, *, training: bool, **compile_kwargs) -> None:
    """`torch.compile` the sensor encoder and the action head of a `VLAPolicy` in place (`--runtime.compile`): training,
    and inference on CUDA (on CPU the runner exports its per-call work instead, inference/tick.py: measured faster).

    Modules are compiled with `nn.Module.compile`, so parameter names and checkpoint keys do not change.
    Training compiles the modules' forwards (the loss path); inference also compiles the sampling step
    functions of the diffusion / flow denoiser (`context` / `step`, models/heads/denoisers.py), or a direct head's
    `memory` / `sample_memory` (the regression head decodes through its layers' weights, not `forward`). Outputs
    equal eager within float tolerance (tests/models/test_heads_compile.py).
    """
    import torch

    if policy.sensor_encoder is not None:
        policy.sensor_encoder.compile(**compile_kwargs)
    denoiser = False
    for child in policy.head.children():
        child.compile(**compile_kwargs)
        if not training and hasattr(child, "step"):  # a denoiser: the sampling path is not forward()
            denoiser = True
            child.context = torch.compile(child.context, **compile_kwargs)
            child.step = torch.compile(child.step, **compile_kwargs)
    if not training and not denoiser:  # a direct head samples through memory + sample_memory, not forward()
        policy.head.memory = torch.compile(policy.head.memory, **compile_kwargs)
        policy.head.sample_memory = torch.compile(policy.head.sample_memory, **compile_kwargs)
