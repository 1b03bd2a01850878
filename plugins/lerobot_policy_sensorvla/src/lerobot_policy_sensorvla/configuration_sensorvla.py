"""`SensorVLAConfig`: the LeRobot policy config of a sensorvla checkpoint, registered as policy type `sensorvla`.

An exported sensorvla folder (`sensorvla export`) has one config.json: sensorvla's own sections (`model`, `data`,
`train`, `runtime`, read by `sensorvla serve`) beside LeRobot's keys (`"type": "sensorvla"`, `input_features`,
`output_features`) and this plugin's (`fps`, `sensor_keys`). LeRobot's `PreTrainedConfig.from_pretrained` parses it
into this class; the sensorvla sections are kept as plain dicts and read by sensorvla itself at load time, with its
own checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lerobot.configs.policies import PreTrainedConfig
from lerobot.optim.optimizers import AdamWConfig

POLICY_TYPE = "sensorvla"


@PreTrainedConfig.register_subclass(POLICY_TYPE)
@dataclass
class SensorVLAConfig(PreTrainedConfig):
    """A sensorvla checkpoint as a LeRobot policy config.

    Args:
        model, data, train, runtime: sensorvla's config sections (`sensorvla.config.SensorVLAConfig`), as saved.
        fps: the training dataset's frame rate: per-frame sensor features are timed by the frame counter at this
            rate when the observation has no `observation.timestamp`.
        sensor_keys: the sensor features the policy reads from the observation (e.g. `observation.force`).
        n_action_steps: actions of each predicted chunk that `select_action` returns before it predicts again
            (None: the whole chunk, the horizon).
        vl_model_override: the backbone's folder or hub id `org/name[@revision]` instead of the recorded one.
    """

    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    fps: float | None = None
    sensor_keys: list[str] = field(default_factory=list)
    n_action_steps: int | None = None
    vl_model_override: str | None = None

    @property
    def horizon(self) -> int:
        """H: actions per predicted chunk."""
        return int(self.model.get("head", {}).get("horizon", 1))

    @property
    def observation_delta_indices(self) -> None:
        """One observation per step (sensor history is kept by the runner's session)."""
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        """The chunk of H future actions a sample carries."""
        return list(range(self.horizon))

    @property
    def reward_delta_indices(self) -> None:
        """No rewards."""
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        """Unused: training stays in sensorvla (`sensorvla train`); LeRobot only runs the policy."""
        return AdamWConfig(lr=1e-4)

    def get_scheduler_preset(self) -> None:
        """Unused (see `get_optimizer_preset`)."""
        return None

    def validate_features(self) -> None:
        """The checkpoint's own config is validated by sensorvla when the policy loads."""
        return None
