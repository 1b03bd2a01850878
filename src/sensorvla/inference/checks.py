"""Request checks before the model: bounded work (`RequestLimits`) and well-formed, finite inputs.

`RequestChecker.check(obs)` is cheap (no model, no image processor) and stateless, so the server runs it on a
decode thread (never its event loop) before a request is queued: a 2 M-character instruction or a 1x1 image is
answered with an error at once instead of occupying the inference thread. Values are cast to the dtypes the model uses
*before* the finiteness check (1e300 is finite in float64 but inf in float32). An instruction holding one of the
tokenizer's special tokens (`<|im_end|>`, `<|image_pad|>`, ...) is refused: inside the chat template it would act
as a control token (end a turn, claim image slots). Sensor timestamps that cannot be on the query's clock in
seconds (all after the query time, ~1000x off, or spaced wider than the whole trained window) are refused with
the likely unit mistake named, instead of becoming a silently all-missing window.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sensorvla.config import ModelConfig
from sensorvla.models import backbones
from sensorvla.serving.protocol import LimitExceededError, ObservationError

__all__ = ["RequestLimits", "RequestChecker"]

# Qwen2-VL's smart_resize refuses aspect ratios of 200 and more.
MAX_ASPECT_RATIO = 200
TOKEN_COUNT_CACHE = 256  # instructions whose token counts a checker remembers (only ones within the char bound)
MS_RATIO = (100.0, 10_000.0)  # a ratio of clocks in this range is read as "one of them is in milliseconds"


def control_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (chat-template and vision control tokens such as `<|im_end|>`,
    `<|image_pad|>`), longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return sorted((t for t in found if t), key=len, reverse=True)


def _looks_like_ms(a: float, b: float) -> bool:
    """a is about 1000x b (both positive): one clock in milliseconds, the other in seconds."""
    return a > 0 and b > 0 and MS_RATIO[0] <= a / b <= MS_RATIO[1]


@dataclass(frozen=True)
class RequestLimits:
    """Work bounds of one request (`sensorvla serve --max-...`).

    Args:
        max_instruction_tokens: instruction length in tokens of the checkpoint's tokenizer.
        max_instruction_chars: checked before tokenizing, so a huge string never reaches the tokenizer;
            None = 16 x max_instruction_tokens (no Qwen token is longer than that in practice).
        max_image_pixels: raw pixels per view (h * w) before the processor resizes to its max_pixels.
        max_sensor_samples: sensor rows per request.
        max_history_samples: sensor samples a connection's history keeps (the oldest are dropped).
    """

    max_instruction_tokens: int = 256
    max_instruction_chars: int | None = None
    max_image_pixels: int = 2048 * 2048
    max_sensor_samples: int = 16384
    max_history_samples: int = 65536

    def __post_init__(self):
        for name in ("max_instruction_tokens", "max_image_pixels", "max_sensor_samples", "max_history_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RequestLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_instruction_chars is not None and self.max_instruction_chars < 1:
            raise ValueError(f"RequestLimits.max_instruction_chars must be >= 1, got {self.max_instruction_chars}")

    @property
    def instruction_chars(self) -> int:
        """The effective character bound."""
        return self.max_instruction_chars or 16 * self.max_instruction_tokens

    def to_json(self) -> dict[str, int]:
        """The bounds as a plain dict (sent in the server handshake)."""
        return {
            "max_instruction_tokens": self.max_instruction_tokens,
            "max_instruction_chars": self.instruction_chars,
            "max_image_pixels": self.max_image_pixels,
            "max_sensor_samples": self.max_sensor_samples,
            "max_history_samples": self.max_history_samples,
        }


def _as_float32(key: str, value: Any, shape_desc: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ObservationError(f"{key!r} must be a real number array {shape_desc}, got dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is what this check looks for
        out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        raise ObservationError(
            f"{key!r}: {bad} value(s) are NaN or inf as float32 (|x| > 3.4e38 overflows); send finite values"
        )
    return out


class RequestChecker:
    """Validates a raw observation for one checkpoint and returns it in model dtypes.

    Args:
        model: the checkpoint's model config (state size, sensor channels, number of views).
        views: the checkpoint's camera names in the model's view order (`data.views`), for the error messages.
        normalizer: its Normalizer (normalized state/sensor values must be finite too).
        processor: the Qwen-VL processor (tokenizer for the token count and its control tokens, patch geometry for
            the minimum size).
        limits: the work bounds.
        window: the checkpoint's `SensorWindow` (window length and gap tolerance) for the timestamp checks; None
            skips the spacing check.
    """

    def __init__(
        self, model: ModelConfig, views: Sequence[str], normalizer, processor, limits: RequestLimits, window=None
    ):
        self.model = model
        self.views = list(views)
        self.normalizer = normalizer
        self.limits = limits
        self.min_side = backbones.family_of_processor(processor).min_image_side(processor)
        # A private copy: the server counts tokens on its decode threads while the worker thread runs the
        # processor, and a fast tokenizer must not be used from two threads when either changes settings (the
        # decode threads share this copy: they only call `encode`, which changes none).
        self._tokenizer = copy.deepcopy(processor.tokenizer)
        self._token_counts: dict[str, int] = {}  # a robot repeats its instruction every call: count it once
        self.window = window
        specials = control_tokens(self._tokenizer)
        self._control = re.compile("|".join(map(re.escape, specials))) if specials else None

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without special tokens (remembered for the last `TOKEN_COUNT_CACHE` instructions)."""
        n = self._token_counts.get(text)
        if n is not None:
            return n
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is not None:
            n = len(backend.encode(text, add_special_tokens=False).ids)
        else:
            n = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(self._token_counts) >= TOKEN_COUNT_CACHE:
            self._token_counts.clear()
        self._token_counts[text] = n
        return n

    def check(self, obs: Any) -> dict[str, Any]:
        """Observation -> checked copy: images list of uint8 (h, w, 3), state float32 (D_st,), sensor
        float32 (N, C_s), sensor_timestamps float64 (N,), timestamp float or None, instruction str.

        Raises:
            LimitExceededError: over a `RequestLimits` bound.
            ObservationError: anything malformed, naming the key and the fix.
        """
        if not isinstance(obs, dict):
            raise ObservationError(f"an observation must be a dict, got {type(obs).__name__}")
        m = self.model
        out: dict[str, Any] = {
            "instruction": self._instruction(obs.get("instruction", "")),
            "images": self._images(obs.get("images")),
        }
        if m.state_dim:
            if "state" not in obs:
                raise ObservationError(f"missing 'state' (float32 ({m.state_dim},)); the policy was trained with it")
            state = _as_float32("state", obs["state"], f"({m.state_dim},)")
            if state.shape != (m.state_dim,):
                raise ObservationError(f"'state' must have shape ({m.state_dim},), got {state.shape}")
            self._finite_normalized("state", state)
            out["state"] = state
        else:
            out["state"] = np.zeros(0, np.float32)
        t = obs.get("timestamp")
        if t is not None:
            t_arr = np.asarray(t)
            if t_arr.shape != () or t_arr.dtype.kind not in "iuf" or not np.isfinite(t_arr.astype(np.float64)):
                raise ObservationError(f"'timestamp' must be one finite number (seconds), got {t!r}")
            t = float(t_arr)
        out["sensor"], out["sensor_timestamps"] = self._sensor(obs)
        self._check_clock(out["sensor_timestamps"], t)
        for spec in self.streams:  # each declared stream with its own source, by name
            out[spec.key], out[spec.ts_key] = self._samples(obs, spec.key, spec.ts_key, spec.shape)
            self._check_clock(out[spec.ts_key], t)
        out["timestamp"] = t
        return out

    @property
    def streams(self):
        """The declared streams with their own source (`sensor.<name>` + `sensor_timestamps.<name>`)."""
        return (
            [s for s in self.window.streams if s.source]
            if self.window is not None and self.model.sensor.enabled
            else []
        )

    def _check_clock(self, ts: np.ndarray, t: float | None) -> None:
        """Refuse sensor timestamps that cannot be seconds on the query's clock (the window would be all missing)."""
        if not len(ts):
            return
        reach = self.window.window_s + self.window.max_gap_s if self.window is not None else 0.0
        if t is not None and ts[0] > t + reach and _looks_like_ms(float(ts[0]), t):
            raise ObservationError(
                f"all {len(ts)} sensor sample(s) are after the query time timestamp={t:.6f} (the first at "
                f"{float(ts[0]):.6f}, about 1000x it): 'sensor_timestamps' look like milliseconds; send seconds"
            )
        if t is not None and t >= 1.0 and t - float(ts[-1]) > reach and _looks_like_ms(t, float(ts[-1])):
            raise ObservationError(
                f"'timestamp'={t:.3f} is about 1000x the newest sensor timestamp {float(ts[-1]):.6f}: the query time "
                "looks like milliseconds and the sensor like seconds; send both in seconds on one clock"
            )
        if self.window is not None and len(ts) >= 2:
            gaps = np.diff(ts)
            # the median only when the widest gap exceeds the window (median <= max): not on a normal stream's calls
            spacing = float(np.median(gaps)) if gaps.max() > self.window.window_s else 0.0
            if spacing > self.window.window_s:
                raise ObservationError(
                    f"sensor samples are {spacing:.6g} apart (median), more than the whole trained window of "
                    f"{self.window.window_s:.6g} s: no window can hold two of them. Are 'sensor_timestamps' in "
                    "milliseconds? Send seconds"
                )

    def _instruction(self, text: Any) -> str:
        if not isinstance(text, str):
            raise ObservationError(f"'instruction' must be a str, got {type(text).__name__}")
        lim = self.limits
        if len(text) > lim.instruction_chars:
            raise LimitExceededError(
                f"'instruction' has {len(text)} characters, over the bound of {lim.instruction_chars} "
                f"(max_instruction_tokens={lim.max_instruction_tokens}); send a shorter instruction or raise "
                "`sensorvla serve --max-instruction-tokens`"
            )
        if self._control is not None:
            found = self._control.search(text)
            if found:
                raise ObservationError(
                    f"'instruction' holds the tokenizer's special token {found.group()!r} (at character "
                    f"{found.start()}): inside the chat template it would act as a control token, not as text. "
                    "Remove it (special tokens such as <|im_end|>, <|image_pad|>, <|vision_start|> are refused)"
                )
        n = self.count_tokens(text)
        if n > lim.max_instruction_tokens:
            raise LimitExceededError(
                f"'instruction' has {n} tokens, over max_instruction_tokens={lim.max_instruction_tokens}; send a "
                "shorter instruction or raise `sensorvla serve --max-instruction-tokens`"
            )
        return str(text)

    def _images(self, images: Any) -> list[np.ndarray]:
        m, views = self.model, self.views
        if images is None:
            raise ObservationError(f"missing 'images': uint8 ({m.num_views}, h, w, 3) in the view order {views}")
        seq = list(images) if isinstance(images, np.ndarray | list | tuple) else None
        if seq is None or len(seq) != m.num_views:
            got = f"{len(seq)}" if seq is not None else type(images).__name__
            raise ObservationError(f"expected {m.num_views} views {views} in 'images', got {got}")
        out = []
        for i, im in enumerate(seq):
            if not isinstance(im, np.ndarray):
                raise ObservationError(f"'images'[{i}] must be a numpy uint8 array (h, w, 3), got {type(im).__name__}")
            if im.dtype != np.uint8:
                raise ObservationError(
                    f"'images'[{i}] has dtype {im.dtype}; send uint8 (0-255) RGB images as in training (the "
                    "runner never rescales other dtypes)"
                )
            if im.ndim != 3 or im.shape[2] != 3:
                raise ObservationError(f"'images'[{i}] must have shape (h, w, 3), got {im.shape}")
            h, w = im.shape[:2]
            if min(h, w) < self.min_side:
                raise ObservationError(
                    f"'images'[{i}] is {h}x{w}; each side must be >= {self.min_side} pixels (Qwen: patch_size x "
                    "merge_size of the image processor: a smaller image has less than one VL token of content)"
                )
            if max(h, w) >= MAX_ASPECT_RATIO * min(h, w):
                raise ObservationError(
                    f"'images'[{i}] is {h}x{w}: the aspect ratio must be < {MAX_ASPECT_RATIO} (image processor)"
                )
            if h * w > self.limits.max_image_pixels:
                raise LimitExceededError(
                    f"'images'[{i}] has {h * w} pixels ({h}x{w}), over "
                    f"max_image_pixels={self.limits.max_image_pixels}; "
                    "resize on the robot (the processor resizes to its max_pixels anyway) or raise "
                    "`sensorvla serve --max-image-pixels`"
                )
            out.append(im)
        return out

    def _sensor(self, obs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        m = self.model
        if not m.sensor.enabled or not m.sensor.channels:  # no sensor tensor input (at most declared streams)
            return np.zeros((0, max(m.sensor.channels, 1)), np.float32), np.zeros(0, np.float64)
        return self._samples(obs, "sensor", "sensor_timestamps", (m.sensor.channels,))

    def _samples(self, obs: dict[str, Any], key: str, ts_key: str, shape: tuple[int, ...]):
        """One stream's samples: values float32 (N, *shape), timestamps float64 (N,) (both empty when absent)."""
        shape = tuple(max(n, 1) for n in shape)
        text = f"(N, {', '.join(map(str, shape))})"
        has_s, has_t = obs.get(key) is not None, obs.get(ts_key) is not None
        if not has_s and not has_t:
            return np.zeros((0, *shape), np.float32), np.zeros(0, np.float64)
        if has_s != has_t:
            raise ObservationError(f"{key!r} and {ts_key!r} come together: send both or neither")
        values = _as_float32(key, obs[key], text)
        if values.size == 0 and values.ndim < len(shape) + 1:
            values = values.reshape(0, *shape)
        if values.shape[1:] != shape:
            raise ObservationError(f"{key!r} must have shape {text}, got {values.shape}")
        if len(values) > self.limits.max_sensor_samples:
            raise LimitExceededError(
                f"{key!r} has {len(values)} samples, over max_sensor_samples={self.limits.max_sensor_samples}; "
                "send only the samples new since the last call (the server keeps the history)"
            )
        ts = np.asarray(obs[ts_key])
        if ts.dtype.kind not in "iuf" or ts.ndim != 1:
            raise ObservationError(f"{ts_key!r} must be float64 (N,), got {ts.dtype} {ts.shape}")
        ts = ts.astype(np.float64)
        if len(ts) != len(values):
            raise ObservationError(
                f"{key!r} has {len(values)} rows but {ts_key!r} has {len(ts)}: one timestamp per row"
            )
        if not np.isfinite(ts).all():
            raise ObservationError(f"{ts_key!r} has NaN or inf values")
        if len(ts) > 1 and not (np.diff(ts) > 0).all():
            i = int(np.flatnonzero(np.diff(ts) <= 0)[0])
            raise ObservationError(
                f"{ts_key!r} must increase strictly: [{i}]={ts[i]:.6f} then [{i + 1}]={ts[i + 1]:.6f}; "
                "sort the samples and drop repeated timestamps"
            )
        if len(values):
            self._finite_normalized(key, values.reshape(len(values), -1))
        return values, ts

    def _finite_normalized(self, key: str, values: np.ndarray) -> None:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            z = np.asarray(self.normalizer.normalize(key, values), dtype=np.float32)
        if not np.isfinite(z).all():
            raise ObservationError(
                f"{key!r} is finite but becomes NaN/inf after normalization with the checkpoint's stats: the "
                "values are absurdly far from the training data (check units and scaling)"
            )
