"""`PolicyRunner`: a pretrained_model folder -> `infer(obs) -> {"actions": (H, D_a), "timing": {...}}` (+ `wrench`
(H, C_f) for a checkpoint with the wrench output).

Uses the training transform chain (`models/processor.py`) and the dataset's window resampling
(`data/timeline.py`), so a raw observation becomes exactly the model inputs training saw. The model is
shared; per-episode state (fast-slow VL features, the sensor history) lives in a `RunnerSession`, one per
server connection (`new_session()`) plus a default one behind `PolicyRunner.infer`. Fast-slow mode reuses
the last VL features and re-runs only the sensor encoder and head; the VL part is refreshed every
`vl_refresh_every` calls, or by a background thread, and its age is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorvla.data.timeline import SensorWindow
from sensorvla.inference.checks import RequestChecker, RequestLimits
from sensorvla.inference.sensor_history import SensorHistory
from sensorvla.inference.tick import FastTick, TickInputs, export_tick, starting_noise
from sensorvla.runtime import bf16_autocast
from sensorvla.serving.protocol import NonFiniteOutputError, ObservationError

logger = logging.getLogger(__name__)

STAGES = ("preprocess_ms", "vl_ms", "sensor_ms", "head_ms", "postprocess_ms")

SENSOR_WINDOW_EMPTY = "SensorWindowEmpty"  # a reply warning: samples were received, none reaches this window

# Fast-slow decisions, taken once per call from one clock read.
COMPUTE, REUSE, REUSE_AND_REFRESH = "compute", "reuse", "reuse_and_refresh"


class SensorClockError(ObservationError):
    """Sensor timestamps that cannot be on the query's clock in seconds (the window would be all missing)."""


class PolicyRunner:
    """Runs a trained policy on raw observations.

    Observation dict (numpy):
        images            uint8 (V, h, w, 3) or a list of V (h, w, 3) arrays, in the checkpoint's view order
        state             float32 (D_st,)                 (omit when the policy has no state input)
        sensor            float32 (N, C_s) raw samples    (the new ones since the last call, or a whole window)
        sensor_timestamps float64 (N,) seconds, strictly increasing, same clock as `timestamp`
        timestamp         float64 () the query time t; defaults to the newest sensor timestamp
        instruction       str

    Args:
        vl_refresh_every: fast-slow mode when > 1: recompute VL features every k calls, reuse in between.
        max_vl_age_s: refresh VL features whenever the cached ones are older than this (seconds).
        background_vl: refresh VL features in a background thread instead of inline.
        generator_seed: seed for diffusion/flow sampling noise (None: nondeterministic).
        limits: work bounds per request (`RequestLimits()` by default).
        max_gap_s: sensor gap tolerance; None = the dataset's rule used in training (`default_max_gap_s`).
        clock: monotonic clock in seconds for the VL feature age (injectable for tests).
        compile_model: compile the per-call model work: on CPU `FastTick` exported and compiled ahead of time with
            AOTInductor on the first call (`inference/tick.py`; needs a C++ compiler), on CUDA `torch.compile` of
            the sensor encoder and head (`runtime.compile_policy`); None = the config's `--runtime.compile`.
    """

    def __init__(
        self,
        policy,
        cfg,
        normalizer,
        processor,
        *,
        vl_refresh_every: int = 1,
        max_vl_age_s: float = 1.0,
        background_vl: bool = False,
        generator_seed: int | None = 0,
        device: str | torch.device = "cpu",
        limits: RequestLimits | None = None,
        max_gap_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        compile_model: bool | None = None,
    ):
        from sensorvla.models.processor import PolicyProcessor

        self.policy = policy.eval()
        self.cfg = cfg
        self.normalizer = normalizer
        self.processor = processor
        self.device = torch.device(device)
        self.transform = PolicyProcessor(normalizer, processor, cfg.model.backbone.prompt_template, cfg.model.state_dim)
        # the same chain without the processor, for fast-slow steps that reuse VL features
        self._transform_no_vl = PolicyProcessor(
            normalizer, None, cfg.model.backbone.prompt_template, cfg.model.state_dim
        )
        self.vl_refresh_every = max(1, vl_refresh_every)
        self.max_vl_age_s = max_vl_age_s
        self.background_vl = background_vl
        self.generator_seed = generator_seed
        self.limits = limits or RequestLimits()
        self.window = SensorWindow.from_config(cfg.data, max_gap_s)  # the checkpoint's window (its config.json)
        self.max_gap_s = self.window.max_gap_s
        self.clock = clock
        self.checker = RequestChecker(cfg.model, cfg.data.views, normalizer, processor, self.limits, self.window)
        self.vl_calls = 0  # VL encodes over all sessions
        self._count_lock = threading.Lock()
        # (VLFeatures, VL mask, fused VL projection, the head's Memory of it | None) of the last head step; replaced
        # as a whole (thread-safe)
        self._vl_projected: tuple[Any, torch.Tensor, torch.Tensor, Any] | None = None
        self.tick = FastTick(self.policy)
        if compile_model is None:
            compile_model = getattr(getattr(cfg, "runtime", None), "compile", False)
        # on CPU the tick is exported and compiled ahead of time (AOTInductor, on the first call: `export_tick`);
        # on CUDA the sensor encoder and head go through `torch.compile` (`runtime.compile_policy`)
        self._compile_tick = bool(compile_model) and self.device.type == "cpu"
        self._exported = None
        self._export_lock = threading.Lock()
        if compile_model and not self._compile_tick:
            from sensorvla.runtime import compile_policy

            compile_policy(self.policy, training=False)
        self._session = RunnerSession(self)

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str = "cpu", merge_lora: bool = True, vl_model: str | None = None, **kwargs
    ) -> PolicyRunner:
        """Load config, weights, LoRA adapters (merged by default) and norm stats from `pretrained_model/`.

        Args:
            vl_model: backbone folder or hub id to use instead of the one recorded in the checkpoint's
                config.json (a checkpoint copied to another machine: `sensorvla serve --vl-model PATH`).
        """
        from sensorvla.data.normalize import Normalizer
        from sensorvla.models.backbone import BackboneLoadError, load_processor
        from sensorvla.models.finetune import merge_lora as merge
        from sensorvla.models.policy import load_pretrained

        try:
            policy, cfg, stats = load_pretrained(path, device=device, vl_model=vl_model)
        except BackboneLoadError as e:
            if vl_model is not None:
                raise
            raise BackboneLoadError(
                f"{e}\nThe backbone path is the one recorded in {Path(path) / 'config.json'}; if the checkpoint "
                "was copied from another machine, pass the backbone's new location with `--vl-model PATH` "
                "(PolicyRunner.from_pretrained(..., vl_model=PATH))"
            ) from e
        if stats is None:
            raise FileNotFoundError(f"{path} has no norm_stats.json; re-export the checkpoint with its stats")
        if merge_lora and cfg.model.finetune.mode == "lora":
            merge(policy)
        bb = cfg.model.backbone
        processor = load_processor(
            bb.vl_model, min_pixels=bb.min_pixels, max_pixels=bb.max_pixels, revision=bb.revision
        )
        return cls(
            policy,
            cfg,
            Normalizer(stats, mode=cfg.data.normalization, streams=cfg.data.streams),
            processor,
            device=device,
            **kwargs,
        )

    # --- metadata for the server -------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """What the server sends in its handshake: views, shapes, sensor window, head, backbone and request limits."""
        m, d = self.cfg.model, self.cfg.data
        return {
            "views": list(d.views),
            "horizon": m.head.horizon,
            "action_dim": m.head.action_dim,
            "state_dim": m.state_dim,
            "sensor_channels": m.sensor.channels if m.sensor.enabled else 0,
            "sensor_window_s": self.window.window_s,
            "sensor_samples": self.window.samples,
            "sensor_max_gap_s": self.max_gap_s,
            "head": m.head.type,
            "vl_model": m.backbone.vl_model,
            "limits": self.limits.to_json(),
            **({"wrench_channels": head.channels} if (head := getattr(self.policy, "wrench_head", None)) else {}),
        }

    @property
    def observation_spec(self) -> dict[str, tuple[tuple[int | None, ...], str]]:
        """The observation keys the runner accepts -> (shape with None for free sizes, dtype kind[, optional]).

        `timestamp` may be left out (the newest sensor sample's time is used), and so may `sensor` with
        `sensor_timestamps` (no new samples: the history, or the "missing" token, is used), so a vision-only
        client sends images, state and instruction only."""
        m = self.cfg.model
        spec: dict[str, tuple] = {
            "images": ((m.num_views, None, None, 3), "uint8"),
            "instruction": ((), "U"),
            "timestamp": ((), "f", True),
        }
        if m.state_dim:
            spec["state"] = ((m.state_dim,), "f")
        if m.sensor.enabled and m.sensor.channels:  # the dataset's sensor tensor, when the policy reads one
            spec["sensor"] = ((None, m.sensor.channels), "f", True)
            spec["sensor_timestamps"] = ((None,), "f", True)
        for s in self.streams:  # each declared stream by name
            spec[s.key], spec[s.ts_key] = ((None, *s.shape), "f", True), ((None,), "f", True)
        return spec

    @property
    def streams(self):
        """The declared streams with their own source: samples `sensor.<name>` (N, *shape) with
        `sensor_timestamps.<name>` (N,), a history and a window each."""
        return self.checker.streams

    def check_request(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Bounds and input checks without the model (the server calls it before queueing); see
        `RequestChecker.check`. Raises `LimitExceededError` / `ObservationError`."""
        return self.checker.check(obs)

    @property
    def compiles(self) -> bool:
        """Whether the per-call model work runs as an exported, compiled graph (`compile_model` on CPU)."""
        return self._compile_tick

    def warm_up(self) -> float:
        """One call on a blank observation (no sensor samples) in a throwaway session: the first VL pass and, when
        `compiles`, the tick's export and compile (tens of seconds) happen now, not in a client's first request.
        Returns the seconds it took; the default session is untouched."""
        m = self.cfg.model
        side = 2 * self.checker.min_side
        obs = {
            "images": np.zeros((m.num_views, side, side, 3), np.uint8),
            "state": np.zeros(m.state_dim, np.float32),
            "instruction": "warm up",
        }
        t0 = time.perf_counter()
        session = self.new_session()
        try:
            session.infer(obs)
        finally:
            session.close()
        return time.perf_counter() - t0

    # --- sessions ----------------------------------------------------------------------------------
    def new_session(self) -> RunnerSession:
        """Fresh per-episode state (VL features, sensor history) over the shared model."""
        return RunnerSession(self)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """`RunnerSession.infer` on the runner's default session."""
        return self._session.infer(obs)

    def reset(self) -> None:
        """Reset the default session (call at an episode start)."""
        self._session.reset()

    @property
    def session(self) -> RunnerSession:
        """The default session used by `infer` / `reset`."""
        return self._session

    # --- the transform chain -----------------------------------------------------------------------
    def raw_sample(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Observation -> raw sample (docs/interfaces.md section 1), checked (`check_request`) and windowed from
        only this observation's own sensor samples: a fresh session's `RunnerSession.raw_sample`, so the stateless
        path and a served episode window the streams through the one history code."""
        return self.new_session().raw_sample(self.check_request(obs))[0]

    def empty_window(self) -> tuple[np.ndarray, np.ndarray]:
        """An all-missing sensor window: zeros float32 (T_s, C_s), mask False (T_s,)."""
        return self.window.empty(self.cfg.model.sensor.channels)

    def sample_from_window(self, obs, images, window: np.ndarray, mask: np.ndarray, streams=None) -> dict[str, Any]:
        """The raw sample dict for `images` (V x (h, w, 3)), a sensor window (T_s, C_s) and its mask (T_s,), and each
        declared stream's window (T, *shape) and mask (T,) by name (`streams`)."""
        m = self.cfg.model
        by_name = {s.name: s for s in self.streams}
        windows = {}
        for name, (values, w_mask) in (streams or {}).items():
            windows.update({by_name[name].key: values.astype(np.float32), by_name[name].mask_key: w_mask})
        return windows | {
            "images": images,
            "state": np.asarray(obs.get("state", np.zeros(m.state_dim)), np.float32),
            "sensor": window.astype(np.float32),
            "sensor_mask": mask,
            "has_sensor": bool(mask.any()) or any(bool(w_mask.any()) for _, w_mask in (streams or {}).values()),
            "instruction": str(obs.get("instruction", "")),
            "sample_id": -1,
        }

    def prepare(self, obs: dict[str, Any], with_vl: bool = True) -> dict[str, torch.Tensor]:
        """Observation -> model batch of one sample (identical to the training path's batch), stateless.
        `with_vl=False` skips the image processor (the VL features are being reused)."""
        return self.batch_from_raw(self.raw_sample(obs), with_vl)

    def batch_from_raw(self, raw: dict[str, Any], with_vl: bool = True) -> dict[str, torch.Tensor]:
        """Raw sample -> model batch of one sample (B = 1)."""
        from sensorvla.models.processor import collate

        if not with_vl:  # no token tensors to pad
            return collate([self._transform_no_vl(raw)])
        from sensorvla.models.backbone import pad_token_id

        return collate([self.transform(raw)], pad_token_id(self.processor))

    # --- model steps -------------------------------------------------------------------------------
    def sync(self) -> None:
        """Wait for queued CUDA work (per-stage timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode_vl(self, batch: dict[str, torch.Tensor]):
        """The frozen VL part: batch with pixels -> `VLFeatures` (feats (1, N, D_vl), mask (1, N), pos (1, N, 3))."""
        with torch.inference_mode():
            vl = self.policy.backbone.encode(batch)
        with self._count_lock:
            self.vl_calls += 1
        return vl

    def head_step(self, batch, vl_feats, outputs: dict | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """Projection, sensor encoder, fusion and head -> (normalized chunk float32 (H, D_a), stage times); with the
        wrench output and an `outputs` dict, `outputs["wrench"]` receives the normalized wrench float32 (H, C_f).

        What depends on the VL features alone is computed once per features and reused while they are (fast-slow
        mode): their projection and, where the fusion keeps the VL tokens as they are (concat, gated), the head's
        `Memory` of them, so a fast tick projects keys and values for the sensor and state tokens only. The rest is
        `FastTick`: eager, or one compiled graph (`compile_model` on CPU; its time is all in `head_ms`)."""
        pol = self.policy
        autocast = bf16_autocast(self.device)
        t1 = time.perf_counter()
        with torch.inference_mode(), autocast:
            cached = self._vl_projected
            if cached is None or cached[0] is not vl_feats:
                vl, vl_mask = pol.backbone.project(*vl_feats)
                v_proj = pol.fusion.project_vl(vl.float())
                v_mem = pol.head.memory(v_proj, vl_mask) if pol.fusion.keeps_vl_tokens else None
                cached = self._vl_projected = (vl_feats, vl_mask, v_proj, v_mem)
            _, vl_mask, v_proj, v_mem = cached
            self.sync()
            t2 = time.perf_counter()
            noise = starting_noise(pol, v_proj, self.generator_seed)  # a sampling head's, from the seed
            state = batch.get("state") if self.cfg.model.state_dim else None
            sensors = {k: v for k, v in batch.items() if k.startswith(("sensor", "has_sensor"))}  # every stream
            if self._compile_tick:
                mem = None if v_mem is None else tuple(v_mem)  # a plain tuple: the exported graph's input
                out = self._compiled_tick((sensors, state, v_proj, vl_mask, mem, noise))
                t3 = t2
            else:
                s_tok, s_mask = self.tick.sensor(sensors)
                self.sync()
                t3 = time.perf_counter()
                out = self.tick.head(s_tok, s_mask, state, v_proj, vl_mask, v_mem, noise)
            chunk, wrench = out if isinstance(out, tuple | list) else (out, None)  # (chunk, wrench): the wrench output
            if wrench is not None and outputs is not None:
                outputs["wrench"] = _numpy(wrench)[0]
        self.sync()
        t4 = time.perf_counter()
        times = {"vl_ms": (t2 - t1) * 1e3, "sensor_ms": (t3 - t2) * 1e3, "head_ms": (t4 - t3) * 1e3}
        return _numpy(chunk)[0], times

    def _compiled_tick(self, inputs: TickInputs) -> torch.Tensor:
        """The tick through its AOTInductor library, exported and compiled on the first call (`export_tick`)."""
        if self._exported is None:
            with self._export_lock:
                if self._exported is None:
                    self._exported = export_tick(self.tick, inputs)
        return self._exported(*inputs)


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A model output as a float32 numpy array (a view of a float32 CPU tensor; copied from another dtype / device)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        x = x.float().cpu()
    return x.numpy()


class RunnerSession:
    """One episode's state over a shared `PolicyRunner`: fast-slow VL features and the sensor history.

    A server keeps one per connection; `reset()` at an episode start (and a new connection) clears both.
    """

    def __init__(self, runner: PolicyRunner):
        self.runner = runner

        def history(channels: int, w: SensorWindow) -> SensorHistory:
            return SensorHistory(channels, w.window_s, w.samples, w.max_gap_s, runner.limits.max_history_samples)

        self.history = history(max(runner.cfg.model.sensor.channels, 1), runner.window)
        # one per declared stream with its own source, on its own window
        self.histories = {s.name: history(int(np.prod(s.shape)), runner.window.of(s)) for s in runner.streams}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        """Forget cached VL features and the sensor history (call at an episode start)."""
        self.join_background()
        with self._lock:
            self._vl: tuple[Any, float] | None = None  # (VLFeatures, clock time of their images)
        self._calls = 0
        self.windows_with_gaps = 0
        self.warnings: list[dict[str, str]] = []  # of the last call (`SENSOR_WINDOW_EMPTY`)
        self.history.reset()
        for h in self.histories.values():
            h.reset()

    def close(self) -> None:
        """Release the session (waits for a background VL refresh)."""
        self.join_background()

    def join_background(self) -> None:
        """Wait for a running background VL refresh."""
        thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None

    # --- sensor history ----------------------------------------------------------------------------
    def raw_sample(self, obs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
        """Checked observation -> (raw sample with the history's window, sensor-history counters).

        New samples go into the history; the window is the trained one ending at `timestamp` (default: the
        newest sample of this request, else the newest buffered one).
        """
        runner = self.runner
        m = runner.cfg.model
        ts, sensor = obs["sensor_timestamps"], obs["sensor"]
        t = obs.get("timestamp")
        if t is None:
            newest = self.history.newest
            t = float(ts[-1]) if len(ts) else (newest if newest is not None else 0.0)
        added = None
        if m.sensor.enabled:
            self.history.check_time(t)  # before extend: a rejected request leaves the history unchanged
            for h in self.histories.values():
                h.check_time(t)
            self._check_all_after(ts, t)
            added = self.history.extend(ts, sensor)
            window, mask = self.history.window(t)
        else:
            window, mask = runner.empty_window()
        streams = {}
        for s in runner.streams:
            h = self.histories[s.name]
            h.extend(obs[s.ts_key], obs[s.key].reshape(len(obs[s.key]), h.channels))
            values, s_mask = h.window(t)
            streams[s.name] = (values.reshape(len(values), *s.shape), s_mask)
        missing = int((~mask).sum())
        if m.sensor.enabled and missing:
            self.windows_with_gaps += 1
        self.warnings = []
        newest = self.history.newest if self.history.newest is not None else (float(ts[-1]) if len(ts) else None)
        if m.sensor.enabled and not mask.any() and newest is not None:  # samples arrived, none reaches this window
            self.warnings.append(
                {
                    "type": SENSOR_WINDOW_EMPTY,
                    "message": f"the sensor window ending at t={t:.6f} has no measured point: the newest "
                    f"sample is at t={newest:.6f} ({t - newest:+.6g} s before the query), beyond the gap tolerance "
                    f"of {self.history.max_gap_s:.6g} s; the policy used its 'missing' sensor token. Check that the "
                    "sensor still streams and that 'timestamp' and 'sensor_timestamps' share one clock in seconds",
                }
            )
        info = {
            "new_samples": added.new if added else 0,
            "duplicate_samples": added.duplicates if added else 0,
            "ignored_old_samples": added.ignored_old if added else 0,
            "buffered_samples": len(self.history),
            "window_points": int(mask.size),
            "missing_points": missing,
            "windows_with_gaps": self.windows_with_gaps,
        }
        if self.histories:
            info["streams"] = {name: {"buffered_samples": len(h)} for name, h in self.histories.items()}
        return runner.sample_from_window(obs, obs["images"], window, mask, streams), info

    def _check_all_after(self, ts: np.ndarray, t: float) -> None:
        """Refuse a request whose samples all come after its query time when nothing buffered reaches the window
        either: the window would be all missing, and the usual cause is a clock or unit mistake."""
        h = self.history
        if not len(ts) or ts[0] <= t or h.count_between(t - h.keep_s, t):
            return
        raise SensorClockError(
            f"all {len(ts)} sensor sample(s) of this request are after the query time timestamp={t:.6f} (the first "
            f"at {float(ts[0]):.6f}, {float(ts[0]) - t:+.6g} s) and none buffered reaches the window ending at it: "
            "the window would be all missing. Are 'sensor_timestamps' in milliseconds, or on another clock than "
            "'timestamp'? Send both in seconds on one clock"
        )

    # --- fast-slow ---------------------------------------------------------------------------------
    def _plan(self) -> tuple[str, tuple | None, float]:
        """Decide once per call, from one clock read, whether VL runs now: (decision, cached features or
        None, now). Reused features are the ones judged here, never a later read."""
        r = self.runner
        now = r.clock()
        with self._lock:
            cached = self._vl
        if cached is None or now - cached[1] > r.max_vl_age_s:
            return COMPUTE, None, now
        if self._calls % r.vl_refresh_every == 0:
            return (REUSE_AND_REFRESH, cached, now) if r.background_vl else (COMPUTE, None, now)
        return REUSE, cached, now

    def _refresh_in_background(self, batch: dict[str, torch.Tensor], stamp: float) -> None:
        """Encode `batch` in a thread; its features are stamped with `stamp` (the time of their images)."""
        if self._thread is not None and self._thread.is_alive():
            return

        def work() -> None:
            vl = self.runner.encode_vl(batch)
            with self._lock:
                self._vl = (vl, stamp)

        self._thread = threading.Thread(target=work, daemon=True, name="vl-refresh")
        self._thread.start()

    # --- inference ---------------------------------------------------------------------------------
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Observation -> {"actions": float32 (H, D_a) in physical units, "actions_normalized", "timing",
        "vl_age_s", "vl_fresh", "sensor_history": {...counters}, "warnings": [{"type", "message"}]} (a warning
        `SensorWindowEmpty` when samples were received but none reaches this window), and, for a checkpoint with the
        wrench output, "wrench": float32 (H, C_f), the predicted force channels at the chunk's steps in the
        sensor's physical units.

        Raises:
            LimitExceededError / ObservationError: a bad request (nothing is run, the history is unchanged).
            NonFiniteOutputError: the model produced NaN/inf actions (none are returned).
        """
        r = self.runner
        t0 = time.perf_counter()
        checked = r.check_request(obs)
        decision, cached, now = self._plan()
        raw, sensor_info = self.raw_sample(checked)
        with_vl = decision != REUSE
        batch = r.batch_from_raw(raw, with_vl)
        if r.device.type != "cpu":  # the batch is built on the CPU
            batch = {k: v.to(r.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        r.sync()
        t1 = time.perf_counter()
        if cached is None:
            self.join_background()
            vl = r.encode_vl(batch)
            with self._lock:
                self._vl = (vl, now)
            age = 0.0
        else:
            vl, stamp = cached
            age = now - stamp
            if decision == REUSE_AND_REFRESH:
                self._refresh_in_background(batch, now)
        t_vl = time.perf_counter()
        self._calls += 1
        outputs: dict[str, np.ndarray] = {}
        normalized, times = r.head_step(batch, vl, outputs)
        t4 = time.perf_counter()
        actions = np.asarray(r.normalizer.unnormalize("actions", normalized), dtype=np.float32)
        extra, checks = {}, [("action", normalized, actions)]
        if "wrench" in outputs:  # the wrench output, physical units (the sensor's force units)
            extra["wrench"] = np.asarray(r.normalizer.unnormalize("wrench", outputs["wrench"]), dtype=np.float32)
            checks.append(("wrench", outputs["wrench"], extra["wrench"]))
        for name, norm, phys in checks:
            if not (np.isfinite(norm).all() and np.isfinite(phys).all()):
                bad = int(phys.size - np.count_nonzero(np.isfinite(phys) & np.isfinite(norm)))
                raise NonFiniteOutputError(
                    f"the policy produced {bad} non-finite {name} value(s) of {phys.size}; no actions are returned. "
                    "The inputs are probably far outside the training data (state/sensor magnitudes and units)"
                )
        t5 = time.perf_counter()
        timing = {
            "preprocess_ms": (t1 - t0) * 1e3,
            "vl_ms": (t_vl - t1) * 1e3 + times["vl_ms"],
            "sensor_ms": times["sensor_ms"],
            "head_ms": times["head_ms"],
            "postprocess_ms": (t5 - t4) * 1e3,
            "total_ms": (t5 - t0) * 1e3,
        }
        return {
            "actions": actions,
            "actions_normalized": normalized,
            "timing": timing,
            "vl_age_s": float(age),
            "vl_fresh": decision == COMPUTE,
            "sensor_history": sensor_info,
            "warnings": list(self.warnings),
            **extra,
        }
