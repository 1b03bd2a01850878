"""`ContactEnv`: the MuJoCo contact tasks (`world/contact.py`) as Gymnasium environments.

The same interface as `InsertionEnv` (its observation and rendering code is reused): the PolicyRunner observation
dict (the task's camera views, `config.views`, two per task; the 6-D tip pose, a window of sensor readings with their
timestamps, the episode time and the instruction); one action is one 10 Hz step (7-D, mm and degrees; rotations
ignored). `info` carries `success` and the task's metrics; `env.unwrapped.sim` holds the simulator and its scripted
expert (`sim.expert_action()`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gymnasium import spaces

from sensorvla.world.contact import TASKS, ContactConfig
from sensorvla.world.envs.insertion import InsertionEnv, observation_space


class ContactEnv(InsertionEnv):
    """A contact task in closed loop (MuJoCo physics, offscreen cameras, a 500 Hz wrist force/torque sensor).

    Terminated on success or on the task's failure (blind bottom: the peak force over its limit; needle: the
    membrane under the target layer punctured); truncated after `max_steps`.

    Args:
        task: "peg_in_hole", "blind_bottom" or "needle".
        config: the task's constants (default: the task's config class); `image_size` overrides its image size.
        sensor_history_s: how much sensor history each observation carries (whole windows, as a client with a
            continuous history would send).
        sensor_available: False sends no sensor samples (a disconnected sensor).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        task: str = "peg_in_hole",
        config: ContactConfig | None = None,
        image_size: int | None = None,
        sensor_history_s: float = 0.25,
        sensor_available: bool = True,
        render_mode: str | None = "rgb_array",
    ):
        if task not in TASKS:
            raise ValueError(f"unknown contact task {task!r}: choose one of {sorted(TASKS)}")
        sim_cls, cfg_cls = TASKS[task]
        cfg = config or cfg_cls()
        if image_size is not None:
            cfg = dataclasses.replace(cfg, image_size=int(image_size))
        self.task, self.cfg = task, cfg
        self.sim = sim_cls(cfg)
        self.views = self.view_names = self.sim.views  # the order of obs["images"] (the task's cameras)
        self.sensor_history_s = sensor_history_s
        self.sensor_available = sensor_available
        self.render_mode = render_mode
        s, c = cfg.image_size, self.sim.sensor_channels
        self.n_sensor = int(round(sensor_history_s * cfg.sensor_rate))
        if sensor_history_s > cfg.settle_s:
            raise ValueError(f"sensor_history_s={sensor_history_s} is longer than the settle time {cfg.settle_s} s")
        self.observation_space = observation_space(s, self.n_sensor, c, views=len(self.views))
        limit = np.array([3.0, 3.0, 3.0, 10.0, 10.0, 10.0, 1.0], np.float32)
        self.action_space = spaces.Box(-limit, limit, dtype=np.float32)
        self._sensor_ts = np.zeros(0)
        self._sensor = np.zeros((0, c), np.float32)
        self._instruction = sim_cls.instructions[0]

    def _info(self) -> dict:
        return {k: (bool(v) if isinstance(v, bool | np.bool_) else v) for k, v in self.sim.info().items()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode (the task's hidden and visible parameters from the env's RNG); (observation, info)."""
        super(InsertionEnv, self).reset(seed=seed)
        episode_seed = int(self.np_random.integers(0, 2**31 - 1))
        self.sim.reset(episode_seed)
        self._instruction = self.sim.instruction
        self._sensor_ts, self._sensor = self.sim.sensor_samples(-self.sensor_history_s - 1.0, 0.0)
        return self._observe(), self._info()

    def _step_end(self, t0: float) -> float:
        """The simulator's own clock after the step (its physics steps add up to the control step)."""
        return self.sim.t

    def _sensor_keep(self) -> int:
        """Four observation windows of sensor samples."""
        return 4 * self.n_sensor

    def _terminated(self) -> bool:
        """Success or the task's failure."""
        return self.sim.success or self.sim.failed

    def close(self):
        """Free the renderer."""
        self.sim.close()
