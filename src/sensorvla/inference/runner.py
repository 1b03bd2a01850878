"""`PolicyRunner`: a pretrained_model folder -> `infer(obs) -> {"actions": (H, D_a), "timing": {...}}`.

Uses the training transform chain (`data/transforms.py`) and the dataset's window resampling
(`data/timeline.py`), so a raw observation becomes exactly the model inputs training saw. Fast-slow mode
reuses the last VL features and re-runs only the sensor encoder and head on fresh sensor windows; the
VL part is refreshed every `vl_refresh_every` calls, or by a background thread, and its age is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

STAGES = ("preprocess_ms", "vl_ms", "sensor_ms", "head_ms", "postprocess_ms")


class StaleFeaturesError(RuntimeError):
    """Reused VL features are older than `max_vl_age_s` and no refresh is possible."""


class PolicyRunner:
    """Runs a trained policy on raw observations.

    Observation dict (numpy):
        images            uint8 (V, h, w, 3) or a list of V (h, w, 3) arrays, in the checkpoint's view order
        state             float32 (D_st,)                 (omit when the policy has no state input)
        sensor            float32 (N, C_s) raw samples    (omit or empty when no sensor is available)
        sensor_timestamps float64 (N,) seconds, same clock as `timestamp`
        timestamp         float64 () the query time t; defaults to the newest sensor timestamp
        instruction       str

    Args:
        vl_refresh_every: fast-slow mode when > 1: recompute VL features every k calls, reuse in between.
        max_vl_age_s: refresh VL features whenever the cached ones are older than this (seconds).
        background_vl: refresh VL features in a background thread instead of inline.
        generator_seed: seed for diffusion/flow sampling noise (None: nondeterministic).
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
    ):
        from sensorvla.data.transforms import SampleTransform

        self.policy = policy.eval()
        self.cfg = cfg
        self.normalizer = normalizer
        self.processor = processor
        self.device = torch.device(device)
        self.transform = SampleTransform(normalizer, processor, cfg.model.backbone.prompt_template, cfg.model.state_dim)
        # the same chain without the processor, for fast-slow steps that reuse VL features
        self._transform_no_vl = SampleTransform(
            normalizer, None, cfg.model.backbone.prompt_template, cfg.model.state_dim
        )
        self.vl_refresh_every = max(1, vl_refresh_every)
        self.max_vl_age_s = max_vl_age_s
        self.background_vl = background_vl
        self.generator_seed = generator_seed
        self.vl_calls = 0
        self._calls = 0
        self._vl: tuple[Any, float] | None = None  # (VLFeatures, monotonic time)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending_obs: dict | None = None

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str = "cpu", merge_lora: bool = True, vl_model: str | None = None, **kwargs
    ) -> PolicyRunner:
        """Load config, weights, LoRA adapters (merged by default) and norm stats from `pretrained_model/`."""
        from sensorvla.data.normalize import Normalizer
        from sensorvla.models.backbone import load_processor
        from sensorvla.models.finetune import merge_lora as merge
        from sensorvla.models.pretrained import from_pretrained

        policy, cfg, stats = from_pretrained(path, device=device, vl_model=vl_model)
        if stats is None:
            raise FileNotFoundError(f"{path} has no norm_stats.json; re-export the checkpoint with its stats")
        if merge_lora and cfg.model.finetune.mode == "lora":
            merge(policy)
        bb = cfg.model.backbone
        processor = load_processor(
            bb.vl_model, min_pixels=bb.min_pixels, max_pixels=bb.max_pixels, revision=bb.revision
        )
        return cls(policy, cfg, Normalizer(stats, mode=cfg.data.normalization), processor, device=device, **kwargs)

    # --- metadata for the server -------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        m, d = self.cfg.model, self.cfg.data
        return {
            "views": list(d.views),
            "horizon": m.head.horizon,
            "action_dim": m.head.action_dim,
            "state_dim": m.state_dim,
            "sensor_channels": m.sensor.channels if m.sensor.enabled else 0,
            "sensor_window_s": d.sensor_window_s,
            "sensor_samples": d.sensor_samples,
            "head": m.head.type,
            "vl_model": m.backbone.vl_model,
        }

    @property
    def observation_spec(self) -> dict[str, tuple[tuple[int | None, ...], str]]:
        m = self.cfg.model
        spec: dict[str, tuple[tuple[int | None, ...], str]] = {
            "images": ((m.num_views, None, None, 3), "u"),
            "instruction": ((), "U"),
            "timestamp": ((), "f"),
        }
        if m.state_dim:
            spec["state"] = ((m.state_dim,), "f")
        if m.sensor.enabled:  # zero rows = no sensor data right now (the learned "missing" token is used)
            spec["sensor"] = ((None, m.sensor.channels), "f")
            spec["sensor_timestamps"] = ((None,), "f")
        return spec

    # --- the transform chain -----------------------------------------------------------------------
    def raw_sample(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Observation -> raw sample (docs/interfaces.md section 1), with the dataset's window resampling."""
        from sensorvla.data.timeline import resample_window

        m, d = self.cfg.model, self.cfg.data
        images = [np.asarray(im, dtype=np.uint8) for im in obs["images"]]
        if len(images) != m.num_views:
            raise ValueError(f"expected {m.num_views} views {list(d.views)}, got {len(images)}")
        sensor = np.asarray(obs.get("sensor", np.zeros((0, max(m.sensor.channels, 1)))), dtype=np.float32)
        ts = np.asarray(obs.get("sensor_timestamps", np.zeros(len(sensor))), dtype=np.float64)
        t = float(obs["timestamp"]) if "timestamp" in obs else (float(ts[-1]) if len(ts) else 0.0)
        channels = max(m.sensor.channels, 1)
        if len(sensor) and m.sensor.enabled:
            window, mask = resample_window(ts, sensor, t, d.sensor_window_s, d.sensor_samples, max_gap_s=self.max_gap_s)
        else:
            window = np.zeros((d.sensor_samples, channels), np.float32)
            mask = np.zeros(d.sensor_samples, bool)
        return {
            "images": images,
            "state": np.asarray(obs.get("state", np.zeros(m.state_dim)), np.float32),
            "sensor": window.astype(np.float32),
            "sensor_mask": mask,
            "has_sensor": bool(mask.any()),
            "instruction": str(obs.get("instruction", "")),
            "sample_id": -1,
        }

    @property
    def max_gap_s(self) -> float:
        from sensorvla.data.dataset import default_max_gap_s

        return default_max_gap_s(self.cfg.data)

    def prepare(self, obs: dict[str, Any], with_vl: bool = True) -> dict[str, torch.Tensor]:
        """Observation -> model batch of one sample (identical to the training path's batch).
        `with_vl=False` skips the image processor (the VL features are being reused)."""
        from sensorvla.data.transforms import collate
        from sensorvla.models.backbone import pad_token_id

        transform = self.transform if with_vl else self._transform_no_vl
        return collate([transform(self.raw_sample(obs))], pad_token_id(self.processor))

    # --- inference ---------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _encode_vl(self, batch: dict[str, torch.Tensor]):
        """The frozen VL pass -> (feats, mask, pos) (a `VLFeatures`)."""
        with torch.inference_mode():
            vl = self.policy.backbone.encode(batch)
        self.vl_calls += 1
        return vl

    def _refresh_in_background(self, batch: dict[str, torch.Tensor]) -> None:
        if self._thread is not None and self._thread.is_alive():
            return

        def work() -> None:
            vl = self._encode_vl(batch)
            with self._lock:
                self._vl = (vl, time.monotonic())

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def _needs_vl(self) -> bool:
        """Whether this call must (or, in background mode, may) run the VL part."""
        with self._lock:
            cached = self._vl
        if cached is None or self._calls % self.vl_refresh_every == 0:
            return True
        return time.monotonic() - cached[1] > self.max_vl_age_s

    def _vl_features(self, batch) -> tuple[Any, float, bool]:
        """Return (VLFeatures, age_s, fresh) according to the fast-slow policy."""
        with self._lock:
            cached = self._vl
        due = cached is None or self._calls % self.vl_refresh_every == 0
        too_old = cached is not None and time.monotonic() - cached[1] > self.max_vl_age_s
        if self.background_vl and cached is not None and not too_old:
            if due:
                self._refresh_in_background(batch)
            return cached[0], time.monotonic() - cached[1], False
        if due or too_old:
            if self._thread is not None:
                self._thread.join()
            vl = self._encode_vl(batch)
            with self._lock:
                self._vl = (vl, time.monotonic())
            return vl, 0.0, True
        return cached[0], time.monotonic() - cached[1], False

    @torch.inference_mode()
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Observation -> {"actions": float32 (H, D_a) in physical units, "actions_normalized", "timing",
        "vl_age_s", "vl_fresh"}."""
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        with_vl = self._needs_vl()
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self.prepare(obs, with_vl).items()}
        self._sync()
        t1 = time.perf_counter()
        vl_feats, age, fresh = self._vl_features(batch)
        if age > self.max_vl_age_s and not fresh:
            raise StaleFeaturesError(f"VL features are {age:.3f}s old (> max_vl_age_s={self.max_vl_age_s})")
        self._calls += 1
        pol = self.policy
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            else nullcontext()
        )
        with autocast:
            vl, vl_mask = pol.backbone.project(*vl_feats)
            self._sync()
            t2 = time.perf_counter()
            s_tok = s_mask = None
            if pol.sensor_encoder is not None:
                s_tok, s_mask = pol.sensor_encoder(
                    batch["sensor"].float(), batch["sensor_mask"].bool(), batch["has_sensor"].bool()
                )
            self._sync()
            t3 = time.perf_counter()
            state = batch.get("state") if self.cfg.model.state_dim else None
            cond, cond_mask = pol.fusion(vl.float(), vl_mask, s_tok, s_mask, None if state is None else state.float())
            gen = None
            if self.generator_seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(self.generator_seed)
            chunk = pol.head.sample(cond, cond_mask, generator=gen)
        self._sync()
        t4 = time.perf_counter()
        normalized = chunk[0].float().cpu().numpy()
        actions = np.asarray(self.normalizer.unnormalize("actions", normalized), dtype=np.float32)
        t5 = time.perf_counter()
        timing.update(
            preprocess_ms=(t1 - t0) * 1e3,
            vl_ms=(t2 - t1) * 1e3,
            sensor_ms=(t3 - t2) * 1e3,
            head_ms=(t4 - t3) * 1e3,
            postprocess_ms=(t5 - t4) * 1e3,
            total_ms=(t5 - t0) * 1e3,
        )
        return {
            "actions": actions,
            "actions_normalized": normalized,
            "timing": timing,
            "vl_age_s": float(age),
            "vl_fresh": bool(fresh),
        }

    def reset(self) -> None:
        """Forget cached VL features (call at an episode start)."""
        if self._thread is not None:
            self._thread.join()
        self._vl, self._calls = None, 0
