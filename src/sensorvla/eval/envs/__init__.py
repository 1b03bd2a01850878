"""Built-in Gymnasium environments. `register_envs()` registers them (explicitly; importing does nothing)."""

from __future__ import annotations

ENV_IDS = {"sensorvla/Insertion-v0": "sensorvla.eval.envs.insertion:InsertionEnv"}


def register_envs() -> None:
    """Register every built-in env id with Gymnasium (idempotent)."""
    import gymnasium as gym

    for env_id, entry in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry)
