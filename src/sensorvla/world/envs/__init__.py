"""Built-in Gymnasium environments. `register_envs()` registers them (explicitly; importing does nothing).

- `sensorvla/Insertion-v0`: success needs vision (lateral alignment to a target seen only in the cameras)
  and the sensor (stopping on a layer seen only by the sensor).
- `sensorvla/InsertionContact-v0`: the same world scored on the contact decision only (lateral error
  reported, not scored): the older, sensor-only benchmark.
- `sensorvla/PegInHole-v0`, `sensorvla/BlindBottom-v0`, `sensorvla/Needle-v0`: the MuJoCo contact benchmark
  (`world/contact.py`; needs `sensorvla[sim]`): tight peg-in-hole, blind-bottom insertion, layered needle insertion.
"""

from __future__ import annotations

ENV_IDS = {
    "sensorvla/Insertion-v0": ("sensorvla.world.envs.insertion:InsertionEnv", {"task": "align_insert"}),
    "sensorvla/InsertionContact-v0": ("sensorvla.world.envs.insertion:InsertionEnv", {"task": "contact"}),
    "sensorvla/PegInHole-v0": ("sensorvla.world.envs.contact:ContactEnv", {"task": "peg_in_hole"}),
    "sensorvla/BlindBottom-v0": ("sensorvla.world.envs.contact:ContactEnv", {"task": "blind_bottom"}),
    "sensorvla/Needle-v0": ("sensorvla.world.envs.contact:ContactEnv", {"task": "needle"}),
}


def register_envs() -> None:
    """Register every built-in env id with Gymnasium (idempotent)."""
    import gymnasium as gym

    for env_id, (entry, kwargs) in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, kwargs=kwargs)
