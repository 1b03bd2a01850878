"""`python -m lerobot_policy_sensorvla.policy_server --host=127.0.0.1 --port=8080`: LeRobot's async inference
policy server with the sensorvla plugin loaded (LeRobot's own `lerobot.async_inference.policy_server` imports no
plugins and accepts only its built-in policy types). Same flags as LeRobot's server."""

from lerobot.async_inference.policy_server import serve

import lerobot_policy_sensorvla  # noqa: F401  (registers the policy type and allows it in async inference)

if __name__ == "__main__":
    serve()
