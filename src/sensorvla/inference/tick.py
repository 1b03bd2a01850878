"""`FastTick`: the model work of one runner call once the VL part is known, as one module over the policy's own.

A call (and every call of fast-slow mode, which reuses the VL features) runs: the sensor encoder on the window, the
fusion's sensor and state tokens, the head's keys / values of them next to those of the reused VL tokens (`Memory`)
and the head's sampling. `PolicyRunner` runs it eagerly (its two halves timed apart), or, with `compile_model` on
CPU, as one graph: `export_tick` traces it with `torch.export` (the number of VL tokens left dynamic) and compiles it
ahead of time with AOTInductor into a shared library called from C++, no Python per op and no guard checks. It is
the same modules and parameters (one implementation); outputs equal eager within float rounding
(tests/inference/test_tick.py). Measured against `torch.compile` of the same modules in docs/decisions.md.

The compiled package is kept on disk (`compiled_cache_dir()`, `<key>.pt2`), keyed by `program_key`: the exported
graph, its inputs' shapes (dynamic sizes by name) and dtypes, the bytes of every weight and buffer it reads, the
device, the torch / sensorvla / Python versions and the host build (vector instructions, threads, compiler). A
later process with the same policy exports again (seconds: the key needs the graph) and loads the package instead
of compiling; a package that does not load, or whose output on the example inputs differs from
eager, is removed with a warning and compiled again (serving never fails on the cache). The folder keeps at most
$SENSORVLA_COMPILED_CACHE_GB (default 2) GB: saving a package removes the least recently used ones beyond that.

A sampling head's starting noise is drawn outside (`DenoisingHead.noise`, with the runner's generator) and passed
in, so an exported graph holds no random-number generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensorvla.models.heads.base import DenoisingHead, Memory

logger = logging.getLogger(__name__)

TickInputs = tuple[Any, ...]  # (sensors, state, v_proj, vl_mask, v_mem, noise): `FastTick`


class FastTick(nn.Module):
    """The sensor encoder, the fusion's tail and the head of a `VLAPolicy`, fed the reused VL part.

    Inputs (B = 1 in the runner): sensors, the batch's sensor part (`sensor` (B, T_s, C_s), `sensor_mask` (B, T_s),
    `has_sensor` (B,), and each declared stream's `sensor.<k>` (B, T_k, *S_k) + `sensor_mask.<k>` (B, T_k)),
    state (B, D_st) float | None, v_proj (B, N_vl, D) the projected VL tokens, vl_mask (B, N_vl) bool, v_mem the
    head's `Memory` of v_proj, or its fields as a plain tuple (keys, values, mask) (None when the fusion changes the
    VL tokens: the whole conditioning is then read here), noise (B, H, D_a) the sampling head's starting noise |
    None. Output: the normalized chunk (B, H, D_a); for a policy with the wrench output the pair (chunk, wrench
    (B, H, C_f) normalized), the wrench head reading the same conditioning.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def sensor(self, sensors: dict[str, torch.Tensor]):
        """The sensor tokens (B, N_s, D) and their mask, or (None, None) for a policy without a sensor input."""
        if self.policy.sensor_encoder is None:
            return None, None
        return self.policy.sensor_encoder(sensors)

    def head(self, s_tok, s_mask, state, v_proj, vl_mask, v_mem: Memory | tuple | None, noise):
        """Fusion tail, the head's memory of it next to the VL part's, and sampling -> chunk (B, H, D_a), or
        (chunk, wrench (B, H, C_f)) with the wrench output."""
        pol = self.policy
        wrench_head = getattr(pol, "wrench_head", None)
        v, tail, tail_mask = pol.fusion.parts(v_proj, vl_mask, s_tok, s_mask, None if state is None else state.float())
        if v_mem is None or wrench_head is not None:  # the whole conditioning
            cond = v if tail is None else torch.cat([v, tail], dim=1)
            mask = vl_mask.bool() if tail is None else torch.cat([vl_mask.bool(), tail_mask], dim=1)
        if v_mem is None:  # the fusion changed the VL tokens: the whole conditioning's memory
            memory = pol.head.memory(cond, mask)
        else:
            v_mem = Memory(*v_mem)
            memory = v_mem if tail is None else v_mem.cat(pol.head.memory(tail, tail_mask))
        chunk = pol.head.sample_memory(memory, noise=noise)
        return chunk if wrench_head is None else (chunk, wrench_head(cond, mask))

    def forward(self, sensors, state, v_proj, vl_mask, v_mem, noise):
        """`head(*sensor(...), ...)`: the whole tick (see the class docstring for the inputs)."""
        s_tok, s_mask = self.sensor(sensors)
        return self.head(s_tok, s_mask, state, v_proj, vl_mask, v_mem, noise)


def starting_noise(
    policy: nn.Module, like: torch.Tensor, generator: torch.Generator | int | None
) -> torch.Tensor | None:
    """A sampling head's starting noise for one sample, None for a regression head. `generator`: a generator, a
    seed (a generator on `like`'s device is made from it, only for a sampling head), or None (nondeterministic)."""
    head = policy.head
    if not isinstance(head, DenoisingHead):
        return None
    if isinstance(generator, int):
        generator = torch.Generator(device=like.device).manual_seed(generator)
    return head.noise(like.shape[0], like, generator)


def dynamic_shapes(inputs: TickInputs, max_vl_tokens: int = 1 << 16) -> tuple:
    """`torch.export`'s dynamic shapes of the tick's `inputs`: the number of VL tokens (the instruction's length and
    the views' sizes set it) is free, every other size is the example's."""
    from torch.export import Dim

    n_vl = Dim("vl_tokens", min=1, max=max_vl_tokens)
    v_mem = inputs[4]
    mem_shapes = None
    if v_mem is not None:
        per_layer = tuple({2: n_vl} for _ in v_mem[0])
        mem_shapes = (per_layer, per_layer, {1: n_vl})
    sensors = {k: None for k in inputs[0]}  # every stream's window: static
    return (sensors, None, {1: n_vl}, {1: n_vl}, mem_shapes, None)


COMPILED_CACHE_ENV = "SENSORVLA_COMPILED_CACHE"  # the folder of compiled ticks; "off" keeps none
COMPILED_CACHE_GB_ENV = "SENSORVLA_COMPILED_CACHE_GB"  # its size budget (default 2 GB), least recently used out
CACHE_FORMAT = "sensorvla-aoti-tick-1"  # bump when what goes into the key or the package changes


def compiled_cache_dir() -> Path | None:
    """Where compiled ticks are kept: $SENSORVLA_COMPILED_CACHE, else `<sensorvla cache>/compiled`
    ($SENSORVLA_CACHE_DIR, else $XDG_CACHE_HOME/sensorvla, else ~/.cache/sensorvla); None when the variable is
    "off" (compile in every process)."""
    from sensorvla.data.fingerprint import cache_dir

    env = os.environ.get(COMPILED_CACHE_ENV)
    if env is not None and env.strip().lower() in ("off", "0", "none", "false"):
        return None
    return Path(env).expanduser() if env else cache_dir() / "compiled"


def compiled_cache_budget() -> int:
    """Bytes the compiled-tick folder may hold: $SENSORVLA_COMPILED_CACHE_GB (default 2) GB."""
    raw = os.environ.get(COMPILED_CACHE_GB_ENV, "2")
    with contextlib.suppress(ValueError):
        if 0 <= (gb := float(raw)) < float("inf"):
            return int(gb * 1e9)
    raise ValueError(f"{COMPILED_CACHE_GB_ENV}={raw!r}: give the compiled-tick cache's size in GB, e.g. 2")


def _prune(folder: Path, keep: Path, budget: int) -> None:
    """Remove the least recently used packages (oldest mtime; a cache hit touches its file) until `folder` holds at
    most `budget` bytes; `keep` (the package just saved) stays whatever its size."""
    files = []
    for p in folder.glob("*.pt2"):
        with contextlib.suppress(OSError):  # another process may remove one meanwhile
            st = p.stat()
            files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files):
        if total <= budget:
            break
        if p != keep:
            with contextlib.suppress(OSError):
                p.unlink()
                logger.info("removed the least recently used compiled tick %s (over %s GB)", p, budget / 1e9)
            total -= size


def _sensorvla_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sensorvla")
    except PackageNotFoundError:
        return "unknown"


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype), with its dtype and shape."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _host_build() -> str:
    """What inductor builds for besides the graph: the CPU's vector instructions (a package built for AVX-512
    must not load on a machine without them: a shared cache folder), the thread count the kernels are built for
    (`OMP_NUM_THREADS`, docs/runtime.md) and the compiler."""
    from torch._inductor import config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return f"{pick_vec_isa()}|threads={torch.get_num_threads()}|{inductor_config.cpp.cxx}|{inductor_config.cpp.threads}"


def program_key(program) -> str:
    """The cache key of an exported tick: sha256 over everything its compiled code depends on. The graph (the
    policy's config and code as traced: layers, sizes, head, steps), every placeholder's shape (dynamic sizes by
    name, so the example's number of VL tokens does not matter), dtype and device, the dynamic sizes' ranges,
    the bytes of every weight, buffer and constant the graph reads, the torch / sensorvla / Python versions, the
    machine, its vector instructions, the thread count and the C++ compiler (`_host_build`). 32 hex digits."""
    h = hashlib.sha256()

    def add(*parts) -> None:
        for p in parts:
            h.update(str(p).encode())
            h.update(b"\0")

    add(CACHE_FORMAT, torch.__version__, _sensorvla_version(), platform.python_version(), platform.machine())
    add(_host_build())
    add(program.graph_module.code, program.graph_signature, sorted(map(str, program.range_constraints.values())))
    for node in program.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            add(node.name, getattr(val, "shape", val), getattr(val, "dtype", ""), getattr(val, "device", ""))
    for name, t in sorted({**program.state_dict, **program.constants}.items()):
        add(name, _tensor_digest(t) if isinstance(t, torch.Tensor) else repr(t))
    return h.hexdigest()[:32]


def _close(got, want, atol: float = 1e-3, rtol: float = 1e-3) -> bool:
    """Whether a loaded package's output matches eager's (a tensor, or a (chunk, wrench) pair)."""
    got, want = (x if isinstance(x, tuple | list) else (x,) for x in (got, want))
    return len(got) == len(want) and all(
        g.shape == w.shape and torch.allclose(g.float(), w.float(), atol=atol, rtol=rtol)
        for g, w in zip(got, want, strict=True)
    )


def _load_cached(path: Path, inputs: TickInputs, want):
    """The package at `path`, or None (and the file removed, with a warning) when it does not load or its output on
    the example `inputs` is not eager's `want`."""
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
        ok = _close(compiled(*inputs), want)
        why = "its output on the example differs from eager"
    except Exception as e:  # a truncated zip, a missing library, a wrong architecture: any failure recompiles
        ok, why = False, f"{type(e).__name__}: {e}"
    if ok:
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to be pruned
        return compiled
    logger.warning("removing the compiled tick cached at %s (%s); compiling it again", path, why)
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _compile(program):
    """AOTInductor's package of `program` as bytes (kept in memory: the package path must end in .pt2, and the
    cache file is written by one rename)."""
    buf = io.BytesIO()
    torch._inductor.aoti_compile_and_package(program, package_path=buf)
    return buf.getvalue()


def _save(data: bytes, path: Path) -> bool:
    """Write the package to the cache atomically (`io.atomic_write_bytes`: two processes compiling at once each
    rename a whole file); False, with a warning, when the folder cannot be written."""
    from sensorvla.io import atomic_write_bytes

    try:
        atomic_write_bytes(path, data)
        return True
    except OSError as e:
        logger.warning("could not keep the compiled tick at %s (%s); it is compiled again next start", path, e)
        return False


def export_tick(tick: FastTick, inputs: TickInputs, cache: str | Path | None = "default"):
    """`tick` traced by `torch.export` on example `inputs` (`v_mem` as a plain tuple; the number of VL tokens
    dynamic) and compiled by AOTInductor; returns a callable with `tick`'s signature. One eager call first fills
    the heads' lazy caches (the DDIM schedule). Compiling needs a C++ compiler (inductor's `cpp.cxx`) and takes
    tens of seconds; the package is kept in `cache` (default `compiled_cache_dir()`; None: none) as
    `<program_key>.pt2` and loaded from there by later processes (see the module docstring)."""
    from torch.export import export

    folder = compiled_cache_dir() if cache == "default" else None if cache is None else Path(cache)
    budget = compiled_cache_budget() if folder is not None else 0  # a bad setting fails before tens of seconds
    t0 = time.perf_counter()
    with torch.no_grad():
        want = tick(*inputs)
        program = export(tick, tuple(inputs), dynamic_shapes=dynamic_shapes(inputs))
        path = None if folder is None else folder / f"{program_key(program)}.pt2"
        if path is not None and path.is_file():
            compiled = _load_cached(path, inputs, want)
            if compiled is not None:
                logger.info("compiled tick loaded from cache %s in %.1f s", path, time.perf_counter() - t0)
                return compiled
        logger.info("compiling the runner's tick (torch.export + AOTInductor) ...")
        data = _compile(program)
        compiled, where = None, "not cached"
        if path is not None and _save(data, path):
            where = f"saved to {path}"
            _prune(folder, path, budget)
            with contextlib.suppress(Exception):  # another process may have removed or replaced it meanwhile
                compiled = torch._inductor.aoti_load_package(str(path))
        if compiled is None:
            compiled = torch._inductor.aoti_load_package(io.BytesIO(data))
    logger.info("compiled the runner's tick in %.1f s (%s)", time.perf_counter() - t0, where)
    return compiled
