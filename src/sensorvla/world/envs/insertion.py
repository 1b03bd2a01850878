"""`InsertionEnv`: the synthetic insertion task in closed loop, as a Gymnasium environment.

Observations follow the PolicyRunner observation dict; one action is one 10 Hz step (7-D, physical
units). The target is visible only in the cameras and the layer only to the sensor, so success needs
both (task "align_insert"); task "contact" scores the contact decision only.
"""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sensorvla.world.synth import ACTION_DT, INSTRUCTIONS, InsertionSim, SimConfig

VIEWS = ("front", "top")
INSTRUCTION_CHARSET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,-'"


def observation_space(image_size: int, n_sensor: int, sensor_channels: int, views: int = len(VIEWS)) -> spaces.Dict:
    """The PolicyRunner observation dict as a Gymnasium space: `views` views, the 6-D pose, a sensor window."""
    s = image_size
    return spaces.Dict(
        {
            "images": spaces.Box(0, 255, (views, s, s, 3), np.uint8),
            "state": spaces.Box(-np.inf, np.inf, (6,), np.float32),
            "sensor": spaces.Box(-np.inf, np.inf, (n_sensor, sensor_channels), np.float32),
            "sensor_timestamps": spaces.Box(-np.inf, np.inf, (n_sensor,), np.float64),
            "timestamp": spaces.Box(-np.inf, np.inf, (), np.float64),
            "instruction": spaces.Text(max_length=200, charset=INSTRUCTION_CHARSET),
        }
    )


class InsertionEnv(gym.Env):
    """Closed-loop needle insertion.

    Success: the tip holds on the hidden layer (within `success_tol_mm`) for 3 steps while the lateral error
    to the target is within `lateral_tol_mm` (task "align_insert"; "contact" drops the lateral condition).
    Failure: overshoot past the layer. Truncation: `max_steps`. `info` reports success, the lateral
    error, the depth error (|tip - layer|) and whether the lateral error is within tolerance.

    Args:
        sim_config: simulator constants; `task` overrides its task.
        sensor_history_s: how much sensor history each observation carries (a whole window, as a client
            with a continuous history would send).
        sensor_available: False sends no sensor samples (a disconnected sensor).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    view_names = VIEWS  # the order of observation["images"] (rollout videos label the views with it)

    def __init__(
        self,
        sim_config: SimConfig | None = None,
        task: str | None = None,
        sensor_history_s: float = 0.25,
        sensor_available: bool = True,
        render_mode: str | None = "rgb_array",
    ):
        cfg = sim_config or SimConfig()
        self.cfg = dataclasses.replace(cfg, task=task) if task else cfg
        self.sensor_history_s = sensor_history_s
        self.views = VIEWS  # the order of obs["images"]
        self.sensor_available = sensor_available
        self.render_mode = render_mode
        s, c = self.cfg.image_size, self.cfg.sensor_channels
        self.n_sensor = int(sensor_history_s * self.cfg.sensor_rate * 0.9)  # always available after reset
        self.observation_space = observation_space(s, self.n_sensor, c)
        limit = np.array([2.0, 2.0, 2.0, 10.0, 10.0, 10.0, 1.0], np.float32)
        self.action_space = spaces.Box(-limit, limit, dtype=np.float32)
        self.sim: InsertionSim | None = None
        self._sensor_ts = np.zeros(0)
        self._sensor = np.zeros((0, c), np.float32)
        self._instruction = INSTRUCTIONS[0]

    def _observe(self) -> dict:
        sim = self.sim
        ts, vals = self._sensor_ts[-self.n_sensor :], self._sensor[-self.n_sensor :]
        if not self.sensor_available:
            # no measurement: zeros stamped long ago (still strictly increasing, as the runner requires), so
            # every window over them is masked as missing
            ts, vals = ts - 1e3, np.zeros_like(vals)
        return {
            "images": np.stack([sim.render(v) for v in self.views]),
            "state": sim.pose.astype(np.float32),
            "sensor": vals.astype(np.float32),
            "sensor_timestamps": ts.astype(np.float64),
            "timestamp": np.array(sim.t, dtype=np.float64),
            "instruction": self._instruction,
        }

    def _info(self) -> dict:
        sim = self.sim
        return {
            "success": sim.success,
            "layer_distance_mm": sim.layer_distance,
            "depth_error_mm": abs(sim.layer_distance),
            "lateral_error_mm": sim.lateral_error,
            "lateral_ok": sim.lateral_error <= self.cfg.lateral_tol_mm,
            "layer_depth_mm": sim.depth,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode (a new target and layer depth from the env's RNG); (observation, info)."""
        super().reset(seed=seed)
        episode_seed = int(self.np_random.integers(0, 2**31 - 1))
        self.sim = InsertionSim(episode_seed, self.cfg)
        self._instruction = INSTRUCTIONS[episode_seed % len(INSTRUCTIONS)]
        self._sensor_ts, self._sensor = self.sim.sensor_samples(-self.sensor_history_s, 0.0)
        return self._observe(), self._info()

    def step(self, action):
        """One 10 Hz step of a 7-D action (clipped to the action space); (obs, reward, terminated, truncated, info)."""
        sim = self.sim
        action = np.clip(np.asarray(action, np.float64), self.action_space.low, self.action_space.high)
        t0 = sim.t
        sim.step(action)
        ts, vals = sim.sensor_samples(t0, self._step_end(t0))
        keep = self._sensor_keep()
        self._sensor_ts = np.concatenate([self._sensor_ts, ts])[-keep:]
        self._sensor = np.concatenate([self._sensor, vals])[-keep:]
        terminated = self._terminated()
        truncated = not terminated and sim.steps >= self.cfg.max_steps
        return self._observe(), float(sim.success), bool(terminated), bool(truncated), self._info()

    def _step_end(self, t0: float) -> float:
        """The end of the step that began at t0 (its sensor samples are those in (t0, end])."""
        return t0 + ACTION_DT

    def _sensor_keep(self) -> int:
        """How many of the newest sensor samples the env keeps between steps."""
        return 4000

    def _terminated(self) -> bool:
        """Success, or the needle pushed past the layer by more than the overshoot limit."""
        return self.sim.success or self.sim.layer_distance < -self.sim.cfg.overshoot_fail_mm

    def render(self):
        """The views side by side, (h, V * w, 3) uint8."""
        return np.concatenate([self.sim.render(v) for v in self.views], axis=1)
