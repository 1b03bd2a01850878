"""The public entry to policy files: build a `VLAPolicy` from a config and the dataset, save / load `pretrained_model/`.

The folder format is `models/folder.py`, the policy and its builder `models/policy.py`, the dataset-derived fields
`config.resolve_from_meta`; this module re-exports them under their documented names.
"""

from __future__ import annotations

from sensorvla.config import resolve_from_meta
from sensorvla.models.folder import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    NORM_STATS_NAME,
    WEIGHTS_NAME,
    CheckpointMismatchError,
    load_state_strict,
    read_safetensors,
    save_pretrained,
    saved_state_dict,
    verify_folder,
)
from sensorvla.models.policy import build_policy
from sensorvla.models.policy import load_pretrained as from_pretrained

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CONFIG_NAME",
    "NORM_STATS_NAME",
    "WEIGHTS_NAME",
    "CheckpointMismatchError",
    "build_policy",
    "from_pretrained",
    "load_state_strict",
    "read_safetensors",
    "resolve_from_meta",
    "save_pretrained",
    "saved_state_dict",
    "verify_folder",
]
