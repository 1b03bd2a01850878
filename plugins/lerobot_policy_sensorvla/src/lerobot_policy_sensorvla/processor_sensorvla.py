"""`make_sensorvla_pre_post_processors`: LeRobot's pipelines around a sensorvla policy, identity on purpose.

Normalization, image resizing, prompt rendering and tokenization are sensorvla's transform chain, run inside the
policy by the same `PolicyRunner` as `sensorvla serve`, so that one implementation serves both. LeRobot's pipelines
only rename observation keys (`--rename_map`) and move tensors; an exported folder holds the same two pipelines as
policy_preprocessor.json / policy_postprocessor.json (`sensorvla.models.folder.lerobot_processors`).
"""

from __future__ import annotations

from typing import Any

from lerobot.processor import (
    DeviceProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    RenameObservationsProcessorStep,
)
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from lerobot.utils.constants import POLICY_POSTPROCESSOR_DEFAULT_NAME, POLICY_PREPROCESSOR_DEFAULT_NAME

from lerobot_policy_sensorvla.configuration_sensorvla import SensorVLAConfig


def make_sensorvla_pre_post_processors(
    config: SensorVLAConfig, dataset_stats: dict[str, Any] | None = None
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]], PolicyProcessorPipeline[PolicyAction, PolicyAction]
]:
    """(preprocessor, postprocessor): rename + device, and device. `dataset_stats` is unused: the checkpoint's
    norm_stats.json normalizes, inside sensorvla's runner."""
    pre = PolicyProcessorPipeline(
        steps=[RenameObservationsProcessorStep(rename_map={}), DeviceProcessorStep(device=config.device or "cpu")],
        name=POLICY_PREPROCESSOR_DEFAULT_NAME,
    )
    post = PolicyProcessorPipeline[PolicyAction, PolicyAction](
        steps=[DeviceProcessorStep(device="cpu")],
        name=POLICY_POSTPROCESSOR_DEFAULT_NAME,
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    return pre, post
