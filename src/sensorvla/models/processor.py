"""The policy's processor: raw sample -> model inputs, the one chain shared by training and `PolicyRunner`.

raw sample (docs/interfaces.md section 1, numpy, physical units)
  -> (training only) image augmentation: random shift + colour jitter (`data/augment.py`)
  -> chat template (V image entries + instruction) -> the family's processor (skipped for cached VL features)
  -> + the data side (`sensorvla.data.transforms.normalize_sample`): state / sensor / actions normalized
     with the checkpoint's NormStats
  -> per-sample torch tensors; `collate` pads tokens and stacks the rest into a model batch (section 3).
Like LeRobot's policy processors, it belongs to the policy: its settings (prompt template, pixel
bounds) are the backbone config and its statistics are the checkpoint's norm_stats.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sensorvla.data.transforms import normalize_sample, stack
from sensorvla.models import backbones
from sensorvla.models.backbone import collate_vl, process_sample

VL_KEYS = backbones.input_keys()  # every family's model-input keys (models/backbones/)


class PolicyProcessor:
    """raw sample dict -> per-sample model-input dict (torch).

    Args:
        normalizer: `sensorvla.data.normalize.Normalizer` built from the checkpoint's NormStats.
        processor: the backbone's processor (`backbone.load_processor`), or None to skip images (features come
            from the VL cache).
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
        out.update(normalize_sample(raw, self.normalizer, self.state_dim))
        return out


def collate(items: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Per-sample dicts -> model batch: VL keys padded/concatenated, everything else stacked on dim 0."""
    batch: dict[str, torch.Tensor] = {}
    if "input_ids" in items[0]:
        batch.update(collate_vl([{k: it[k] for k in VL_KEYS if k in it} for it in items], pad_token_id))
    batch.update(stack(items, skip=VL_KEYS))
    return batch
