"""The public entry to policy files: build a `VLAPolicy` from a config and the dataset, save / load `pretrained_model/`.

The folder format is `models/folder.py`, the policy and its builder `models/policy.py`; this module resolves the
dataset-derived fields and re-exports both under their documented names.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sensorvla.config import SensorVLAConfig
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

logger = logging.getLogger(__name__)


def resolve_from_meta(cfg: SensorVLAConfig, meta: Any) -> SensorVLAConfig:
    """Fill the dataset-derived model fields (views, D_a, H, C_s, D_st) from dataset metadata.

    Values the user set explicitly (non-zero) must agree with the dataset; otherwise this raises with the fix.
    """
    m = cfg.model
    views = list(cfg.data.views) or list(meta.views)
    missing = sorted(set(views) - set(meta.views))
    if missing:
        raise ValueError(f"--data.views {missing} not in the dataset (it has {list(meta.views)})")
    derived = {
        ("head", "action_dim"): int(meta.action_dim),
        ("head", "horizon"): int(cfg.data.horizon),
        ("sensor", "channels"): int(meta.sensor_channels or 0),
        ("sensor", "force_channels"): int(getattr(meta, "force_channels", m.sensor.force_channels)),
    }
    new_m = dataclasses.replace(m, num_views=len(views), state_dim=int(meta.state_dim or 0))
    for (section, name), value in derived.items():
        sub = getattr(new_m, section)
        current = getattr(sub, name)
        if current and current != value and name != "force_channels":
            raise ValueError(
                f"--model.{section}.{name}={current} disagrees with the dataset ({value}); leave it at 0 "
                "to derive it, or use a matching dataset"
            )
        setattr(new_m, section, dataclasses.replace(sub, **{name: value}))
    if new_m.sensor.enabled and not new_m.sensor.channels:
        logger.warning("dataset has no sensor stream: running vision-only (sensor disabled)")
        new_m = dataclasses.replace(new_m, sensor=dataclasses.replace(new_m.sensor, enabled=False))
    data = dataclasses.replace(cfg.data, views=tuple(views))
    return dataclasses.replace(cfg, model=new_m, data=data)
