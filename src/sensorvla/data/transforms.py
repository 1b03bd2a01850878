"""The data side of the transform chain: a raw sample's state, sensor and actions -> normalized tensors.

raw sample (docs/interfaces.md section 1, numpy, physical units)
  -> normalize state / sensor (masked; after the stats' sensor transform) / actions with the NormStats
  -> per-sample torch tensors; `stack` batches them.
The policy's processor (`sensorvla.models.processor.PolicyProcessor`) adds the image and instruction part
(augmentation in training, chat template, Qwen image processor) on top of this and is what training and
`PolicyRunner` both call. Nothing in `data/` imports `models/`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def normalize_sample(raw: dict[str, Any], normalizer, state_dim: int) -> dict[str, torch.Tensor]:
    """The non-VL model inputs of one raw sample: state (D_st,), sensor (T_s, C_s) + mask (T_s,), has_sensor
    (any stream, the legacy tensor or a declared one, has a valid sample in its window), each declared stream's
    `sensor.<name>` + `sensor_mask.<name>`, sample_id, actions (H, D_a) + action_mask (H,) when the sample has
    actions, and
    wrench_target (H, C_f) + wrench_target_mask (H,) when it has the wrench output's target."""
    out: dict[str, torch.Tensor] = {}
    if state_dim:
        state = normalizer.normalize("state", np.asarray(raw["state"], dtype=np.float32))
        out["state"] = torch.as_tensor(np.asarray(state, dtype=np.float32))
    mask = np.asarray(raw["sensor_mask"], dtype=bool)
    sensor = np.asarray(raw["sensor"], dtype=np.float32)
    if sensor.size and mask.any():
        sensor = normalizer.normalize("sensor", sensor)
    sensor = np.where(mask[:, None], sensor, 0.0).astype(np.float32)
    out["sensor"] = torch.from_numpy(np.ascontiguousarray(sensor))
    out["sensor_mask"] = torch.from_numpy(mask.copy())
    any_valid = bool(mask.any())
    for key in [k for k in raw if k.startswith("sensor.")]:  # a declared stream's window (T, *shape) + mask (T,)
        values, mask = np.asarray(raw[key], np.float32), np.asarray(raw["sensor_mask." + key[7:]], bool)
        if mask.any():
            values = normalizer.normalize(key, values.reshape(len(values), -1)).reshape(values.shape)
            any_valid = True
        values = np.where(mask.reshape(-1, *[1] * (values.ndim - 1)), values, 0.0).astype(np.float32)
        out[key], out["sensor_mask." + key[7:]] = torch.from_numpy(values), torch.from_numpy(mask.copy())
    # "with sensor" (the `--sensor-loss-weight` sample weight): any stream, legacy or declared, has a valid sample
    out["has_sensor"] = torch.tensor(bool(raw["has_sensor"]) and any_valid)
    out["sample_id"] = torch.tensor(int(raw.get("sample_id", -1)), dtype=torch.long)
    if raw.get("actions") is not None:
        actions = normalizer.normalize("actions", np.asarray(raw["actions"], dtype=np.float32))
        out["actions"] = torch.as_tensor(np.asarray(actions, dtype=np.float32))
        out["action_mask"] = torch.as_tensor(np.asarray(raw["action_mask"], dtype=bool))
    # the wrench output's target (H, C_f), normalized with the sensor's statistics where measured (stats without a
    # sensor, e.g. a vision-only checkpoint's, have no wrench output: the target is left out)
    if raw.get("wrench_target") is not None and "sensor" in getattr(getattr(normalizer, "stats", None), "stats", {}):
        wmask = np.asarray(raw["wrench_target_mask"], dtype=bool)
        wrench = np.asarray(raw["wrench_target"], dtype=np.float32)
        if wmask.any():
            wrench = np.asarray(normalizer.normalize("wrench", wrench), np.float32)
        out["wrench_target"] = torch.from_numpy(np.where(wmask[:, None], wrench, 0.0).astype(np.float32))
        out["wrench_target_mask"] = torch.from_numpy(wmask.copy())
    return out


def stack(items: Sequence[dict[str, torch.Tensor]], skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Per-sample dicts -> a batch, every key (but `skip`) stacked on dim 0."""
    return {key: torch.stack([it[key] for it in items]) for key in items[0] if key not in skip}


class TransformedDataset(torch.utils.data.Dataset):
    """Applies a transform (the policy's processor) to a raw-sample dataset (runs inside DataLoader workers)."""

    def __init__(self, raw_dataset, transform: Callable[[dict[str, Any]], dict[str, torch.Tensor]]):
        self.raw = raw_dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.transform(self.raw[index])
