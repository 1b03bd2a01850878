"""The one transform chain shared by training and `PolicyRunner`: raw sample -> model inputs.

raw sample (docs/interfaces.md section 1, numpy, physical units)
  -> (training only) image augmentation: random shift + colour jitter (`data/augment.py`)
  -> normalize state / sensor (masked) / actions with the checkpoint's NormStats
  -> chat template (V image entries + instruction) -> Qwen processor      (skipped for cached VL features)
  -> per-sample torch tensors; `collate` pads tokens and stacks the rest into a model batch (section 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sensorvla.models.backbone import collate_vl, process_sample

VL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


class SampleTransform:
    """raw sample dict -> per-sample model-input dict (torch).

    Args:
        normalizer: `sensorvla.data.normalize.Normalizer` built from the checkpoint's NormStats.
        processor: the Qwen-VL processor, or None to skip images (features come from the VL cache).
        prompt_template: `--model.backbone.prompt-template`.
        state_dim: D_st; 0 drops the state.
        augment: an `ImageAugment` for training; None (the default, and always in PolicyRunner) = off.
    """

    def __init__(self, normalizer, processor, prompt_template: str, state_dim: int, augment=None):
        self.normalizer = normalizer
        self.processor = processor
        self.prompt_template = prompt_template
        self.state_dim = state_dim
        self.augment = augment

    def __call__(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One raw sample -> per-sample tensors (see the module docstring)."""
        out: dict[str, torch.Tensor] = {}
        if self.processor is not None:
            images = raw["images"]
            if self.augment is not None:
                images = self.augment(images, int(raw.get("sample_id", 0)), int(raw.get("epoch", 0)))
            out.update(process_sample(self.processor, images, raw["instruction"], self.prompt_template))
        if self.state_dim:
            state = self.normalizer.normalize("state", np.asarray(raw["state"], dtype=np.float32))
            out["state"] = torch.as_tensor(np.asarray(state, dtype=np.float32))
        mask = np.asarray(raw["sensor_mask"], dtype=bool)
        sensor = np.asarray(raw["sensor"], dtype=np.float32)
        if sensor.size and mask.any():
            sensor = self.normalizer.normalize("sensor", sensor)
        sensor = np.where(mask[:, None], sensor, 0.0).astype(np.float32)
        out["sensor"] = torch.from_numpy(np.ascontiguousarray(sensor))
        out["sensor_mask"] = torch.from_numpy(mask.copy())
        out["has_sensor"] = torch.tensor(bool(raw["has_sensor"]) and bool(mask.any()))
        out["sample_id"] = torch.tensor(int(raw.get("sample_id", -1)), dtype=torch.long)
        if raw.get("actions") is not None:
            actions = self.normalizer.normalize("actions", np.asarray(raw["actions"], dtype=np.float32))
            out["actions"] = torch.as_tensor(np.asarray(actions, dtype=np.float32))
            out["action_mask"] = torch.as_tensor(np.asarray(raw["action_mask"], dtype=bool))
        return out


def collate(items: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Per-sample dicts -> model batch: VL keys padded/concatenated, everything else stacked on dim 0."""
    batch: dict[str, torch.Tensor] = {}
    if "input_ids" in items[0]:
        batch.update(collate_vl([{k: it[k] for k in VL_KEYS if k in it} for it in items], pad_token_id))
    for key in items[0]:
        if key in VL_KEYS:
            continue
        batch[key] = torch.stack([it[key] for it in items])
    return batch


class TransformedDataset(torch.utils.data.Dataset):
    """Applies a `SampleTransform` to a raw-sample dataset (runs inside DataLoader workers)."""

    def __init__(self, raw_dataset, transform: SampleTransform):
        self.raw = raw_dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.transform(self.raw[index])
