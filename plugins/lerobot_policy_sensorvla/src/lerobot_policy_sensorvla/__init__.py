"""lerobot_policy_sensorvla: sensorvla policies as LeRobot policies (policy type `sensorvla`).

LeRobot imports this package by its name (`register_third_party_plugins`, any installed `lerobot_policy_*`
distribution) in lerobot-eval, lerobot-record, lerobot-train and the async robot client. Importing it registers the
config class (`configuration_sensorvla`), which LeRobot's factory maps to `modeling_sensorvla.SensorVLAPolicy` and
`processor_sensorvla.make_sensorvla_pre_post_processors` by naming convention, and adds `sensorvla` to the async
inference server's supported policies (its server does not load plugins itself: start it with
`python -m lerobot_policy_sensorvla.policy_server`). Training stays in sensorvla (README.md).
"""

from lerobot_policy_sensorvla.configuration_sensorvla import POLICY_TYPE, SensorVLAConfig
from lerobot_policy_sensorvla.modeling_sensorvla import SensorVLAPolicy
from lerobot_policy_sensorvla.processor_sensorvla import make_sensorvla_pre_post_processors


def _allow_in_async_inference() -> None:
    """Add `sensorvla` to lerobot.async_inference's SUPPORTED_POLICIES (a list its server checks in place)."""
    try:
        from lerobot.async_inference import constants
    except ImportError:  # lerobot without the async extra (grpc)
        return
    if POLICY_TYPE not in constants.SUPPORTED_POLICIES:
        constants.SUPPORTED_POLICIES.append(POLICY_TYPE)


_allow_in_async_inference()

__all__ = ["POLICY_TYPE", "SensorVLAConfig", "SensorVLAPolicy", "make_sensorvla_pre_post_processors"]
