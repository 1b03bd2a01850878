"""The contact benchmark: MuJoCo physics tasks with a 6-axis wrist force/torque sensor (scenes in `mjscenes.py`).

Three tasks, each a simulator with a scripted expert (the Gymnasium envs are in `world/envs/contact.py`):

- `PegInHoleSim`: a capsule peg into a square hole, diametral clearance 0.8 mm; the hole's position varies per
  episode and is seen only by the cameras. Success: the tip 15 mm down the hole.
- `BlindBottomSim`: the same peg into a hole whose bottom depth varies per episode and is never drawn, held by a
  laterally compliant hand (300 N/m, as insertion hands are: a peg off the axis slides along the wall); seat the peg
  and stop pushing. Success: seated (tip within 1 mm of the bottom) and still for 3 steps with the contact force
  under `final_force_n`, and the peak contact force of the whole episode under `peak_force_n`.
- `NeedleSim`: a needle into layered tissue; the entry mark (a 10 mm disc, a dark dot at its centre) is seen by the
  cameras, the membranes only by the sensor (force: each membrane's stiffness and puncture; an A-scan-like 1-D depth
  profile ahead of the tip). Success: stop between the 2nd and 3rd membrane under the surface, on the mark, still
  for 3 steps.

Interface (the same as the kinematic `InsertionSim`): mm and degrees; an action is a per-100 ms delta of the hand's
position setpoint [dx, dy, dz, droll, dpitch, dyaw, tool] (rotations are ignored: the hand only translates; tool is
1 while driving, 0 once holding); `pose` is the measured tip pose [x, y, z, 0, 0, 0] (z = 0 on the fixture's top
face); `target` is the hole's (the entry mark's) x, y and `depth` the hidden depth (mm), both privileged, read only by
the expert. The sensor stream is one reading per physics step (timestep 2 ms: 500 Hz), stamped at the end of its step
(causal: a frame at t sees readings up to t): force (N) and torque (N m) at the wrist in the world frame, plus the
needle's A-scan bins. Cameras render offscreen at the control rate.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from sensorvla.world import mjscenes

CONTROL_RATE = 10.0  # Hz: one action per 100 ms, as the kinematic task
FT_CHANNELS = 6


def import_mujoco():
    """`mujoco`, with an offscreen GL backend chosen on Linux when MUJOCO_GL is unset (EGL: Mesa's software renderer
    on a machine without a GPU, one render thread unless LP_NUM_THREADS says otherwise: a 64 px frame is too small
    for llvmpipe's threads to pay off, and on a loaded 2-core machine one thread renders it about 5x faster); a
    missing package raises ImportError naming the install extra."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
        os.environ.setdefault("LP_NUM_THREADS", "1")
    try:
        import mujoco
    except ImportError as e:
        raise ImportError(
            "the contact benchmark needs MuJoCo: pip install 'sensorvla[sim]' (and, for offscreen rendering, "
            "apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri; or libosmesa6 with MUJOCO_GL=osmesa)"
        ) from e
    return mujoco


@dataclass
class ContactConfig:
    """Constants shared by the contact tasks (mm, N, s, Hz)."""

    image_size: int = 64
    timestep: float = 0.002  # physics step = sensor period
    max_steps: int = 100
    settle_s: float = 0.3  # physics run before t = 0 (the first observation has a full sensor history)
    state_rate: float = 100.0  # recorded state stream
    force_noise_n: float = 0.02
    torque_noise_nm: float = 0.0002
    target_range_mm: float = 12.0  # the hole / entry mark: x, y ~ U(-range, range)
    start_range_mm: float = 18.0
    start_height_mm: tuple[float, float] = (18.0, 28.0)
    kp_xy: float = 2000.0  # N/m, the hand's position servo
    kp_z: float = 2000.0
    views: tuple[str, ...] = mjscenes.VIEWS  # the cameras observed, in the order of observation["images"]: the
    # recorder, the env and the bench read them here (names in sorted order: a dataset lists its views sorted)

    def __post_init__(self):
        views = tuple(self.views)
        unknown = sorted(set(views) - set(mjscenes.CAMERAS))
        if not views or unknown or len(set(views)) != len(views) or list(views) != sorted(views):
            raise ValueError(
                f"views={views}: name distinct cameras of {mjscenes.CAMERAS} in sorted order (a dataset lists its "
                "views sorted, and the policy reads observation['images'] in the dataset's order)"
            )
        self.views = views

    @property
    def sensor_rate(self) -> float:
        """Sensor samples per second (one per physics step)."""
        return 1.0 / self.timestep

    @property
    def substeps(self) -> int:
        """Physics steps per control step."""
        return int(round(1.0 / (CONTROL_RATE * self.timestep)))


@dataclass
class PegConfig(ContactConfig):
    """Peg-in-hole constants (mm)."""

    peg_radius_mm: float = 4.6
    hole_half_width_mm: float = 5.0  # diametral clearance 2 * (5.0 - 4.6) = 0.8 mm
    hole_depth_mm: float = 20.0
    insert_goal_mm: float = 15.0
    target_range_mm: float = 15.0  # the rounded tip finds a hole within about its radius: a wide range keeps
    # the peg that aims at the centre (no cameras) out of most holes


@dataclass
class BlindBottomConfig(PegConfig):
    """Blind-bottom constants (mm, N)."""

    depth_range_mm: tuple[float, float] = (6.0, 18.0)
    seat_tol_mm: float = 1.0
    peak_force_n: float = 8.0
    final_force_n: float = 3.0
    target_range_mm: float = 8.0
    kp_xy: float = 300.0  # a laterally compliant wrist (as insertion hands have): a peg 0.5-2 mm off the hole's axis
    # slides along the wall instead of jamming on it (docs/decisions.md "Blind bottom: a compliant wrist")


@dataclass
class NeedleConfig(ContactConfig):
    """Layered tissue constants (mm, N). Membrane 0 is the surface; the task stops between membrane `target_layer`
    and the next one. A membrane deflects with the tip (stiffness) until its force reaches the puncture force."""

    ascan_bins: int = 32
    ascan_range_mm: float = 8.0  # depth covered ahead of the tip, as the kinematic task's A-scan
    ascan_noise: float = 0.03
    first_depth_mm: tuple[float, float] = (2.0, 10.0)  # membrane 1 under the surface
    gap_mm: tuple[float, float] = (1.8, 3.0)  # between the next membranes
    stiffness_n_per_mm: tuple[float, ...] = (1.5, 2.5, 3.0, 3.0)
    puncture_n: tuple[float, ...] = (0.8, 1.2, 1.6, 1.6)
    friction_n_per_mm: float = 0.03  # sliding friction per mm of shaft in the tissue
    lateral_n_per_mm: float = 0.5  # the tissue's lateral stiffness around the track
    target_layer: int = 2
    lateral_tol_mm: float = 1.0
    start_height_mm: tuple[float, float] = (8.0, 16.0)
    kp_z: float = 4000.0  # a stiffer axial servo: a puncture's lunge is force / kp
    mark_radius_mm: float = 10.0  # the entry mark's disc, drawn on the surface only (docs/sim.md: 3 and 5 mm were
    # about 3 and 7 px across at 64 px, and no policy found them)
    views: tuple[str, ...] = ("top", "wrist")  # the wrist camera for the final alignment: the static views are
    # ~1.4 mm per pixel at 64 px against the 1 mm lateral tolerance (docs/decisions.md, "needle wrist camera")


class ContactSim:
    """One MuJoCo world and its episodes: `reset(seed)` draws an episode, `step(action)` advances 100 ms.

    Subclasses give the scene (`xml`), the per-episode draw (`_draw`), the success rule (`_score`) and the expert.
    The model and the renderer are built on first use and kept across episodes.
    """

    instructions: tuple[str, ...] = ("",)
    expert_modes: tuple[str, ...] = ("expert",)
    sensor_channels = FT_CHANNELS  # [fx, fy, fz (N), tx, ty, tz (N m)]
    force_channels = FT_CHANNELS

    def __init__(self, cfg: ContactConfig):
        self.cfg = cfg
        self.model = self.data = self._renderer = None
        self.target = np.zeros(2)
        self.depth = 0.0
        self.expert_mode = self.expert_modes[0]
        self.expert_vision = True  # False: the expert assumes the target at the workspace centre (no cameras)
        self.aim_offset = np.zeros(2)  # mm added to the target the expert aims at (a recording's aim noise)

    @property
    def views(self) -> tuple[str, ...]:
        """The cameras this task observes (`cfg.views`), in the order of the observation's images."""
        return self.cfg.views

    def sensor_names(self) -> list[str]:
        """One name per sensor channel."""
        return ["fx_n", "fy_n", "fz_n", "tx_nm", "ty_nm", "tz_nm"]

    # --- building ---------------------------------------------------------------------------------------------
    def xml(self) -> str:
        """The scene's MJCF."""
        raise NotImplementedError

    def _build(self) -> None:
        mujoco = import_mujoco()
        self.mj = mujoco
        self.model = mujoco.MjModel.from_xml_string(self.xml())
        self.data = mujoco.MjData(self.model)
        missing = [v for v in self.views if mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, v) < 0]
        if missing:
            raise ValueError(f"{type(self).__name__}'s scene has no camera {missing}: choose views among its cameras")

    def _draw(self, rng: np.random.Generator) -> None:
        """Draw the episode's hidden and visible parameters into the model."""
        raise NotImplementedError

    # --- episode ----------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        """A new episode for `seed`: its parameters, the hand at its start pose, `settle_s` of physics (negative
        times) so that the sensor history is full at t = 0."""
        if self.model is None:
            self._build()
        c, rng = self.cfg, np.random.default_rng(seed)
        self.rng = rng
        self.noise_rng = np.random.default_rng([seed, 1])
        self.mj.mj_resetData(self.model, self.data)
        self._draw(rng)
        start = [*rng.uniform(-c.start_range_mm, c.start_range_mm, 2), rng.uniform(*c.start_height_mm)]
        self.data.qpos[:3] = np.asarray(start) / 1000.0
        self.setpoint = self.data.qpos[:3].copy()
        self.data.ctrl[:3] = self.setpoint
        self.instruction = self.instructions[seed % len(self.instructions)]
        self.steps, self.held, self.k = 0, 0, -int(round(c.settle_s * c.sensor_rate))
        self.data.time = self.k * c.timestep
        self._ts, self._vals, self._state = [], [], []
        self.peak_force = 0.0
        self._advance(self.setpoint, -self.k)
        self.free_force = np.mean(self._vals[-1][-20:, :3], axis=0)  # the tool's weight, as read at rest
        self.peak_force = 0.0
        self.last_action = np.zeros(7)
        self.aim_offset = np.zeros(2)

    @property
    def t(self) -> float:
        """Episode time (s): steps / control rate."""
        return self.steps / CONTROL_RATE

    @property
    def pose(self) -> np.ndarray:
        """Measured tip pose [x, y, z mm, 0, 0, 0]."""
        return np.concatenate([self.data.qpos[:3] * 1000.0, np.zeros(3)])

    def _substep(self) -> None:
        """Hook before each physics step (the needle's tissue forces)."""

    def _after_substep(self) -> None:
        """Hook after each physics step (contact bookkeeping)."""

    def _advance(self, setpoint: np.ndarray, n: int) -> None:
        """`n` physics steps ramping the servo setpoint linearly to `setpoint`; one sensor reading per step."""
        d, c = self.data, self.cfg
        start = d.ctrl[:3].copy()
        ts, vals, state = np.empty(n), np.empty((n, FT_CHANNELS)), np.empty((n, 3))
        for i in range(n):
            d.ctrl[:3] = start + (setpoint - start) * (i + 1) / n
            self._substep()
            self.mj.mj_step(self.model, d)
            self.k += 1
            ts[i] = self.k / c.sensor_rate
            vals[i] = d.sensordata[:FT_CHANNELS]
            state[i] = d.qpos[:3]
            self._after_substep()
        vals[:, :3] += self.noise_rng.normal(0, c.force_noise_n, (n, 3))
        vals[:, 3:] += self.noise_rng.normal(0, c.torque_noise_nm, (n, 3))
        self._ts.append(ts)
        self._vals.append(self._extend_readings(vals, state))
        self._state.append(state * 1000.0)
        self._rendered_at = None

    def _extend_readings(self, ft: np.ndarray, state: np.ndarray) -> np.ndarray:
        """The full sensor rows for one stretch of physics steps (force/torque; the needle appends its A-scan)."""
        return ft

    def step(self, action: np.ndarray, perturbation: np.ndarray | None = None) -> None:
        """Apply a commanded action (plus an optional execution perturbation in mm, DART) for 100 ms."""
        delta = np.asarray(action[:3], np.float64)
        if perturbation is not None:
            delta = delta + np.asarray(perturbation[:3], np.float64)
        self.setpoint = self.setpoint + delta / 1000.0
        self._advance(self.setpoint, self.cfg.substeps)
        self.steps += 1
        self.last_action = np.asarray(action, np.float64)
        self.held = self.held + 1 if self._holding(np.asarray(action, np.float64)) else 0

    def _holding(self, action: np.ndarray) -> bool:
        """Whether this step counts towards the 3 still steps of success."""
        raise NotImplementedError

    @property
    def success(self) -> bool:
        """The task's success (see the module docstring)."""
        return self.held >= 3

    @property
    def failed(self) -> bool:
        """An unrecoverable failure (ends the episode)."""
        return False

    def info(self) -> dict[str, Any]:
        """The task's episode metrics."""
        return {"success": self.success}

    # --- sensing ----------------------------------------------------------------------------------------------
    @property
    def contact_force(self) -> float:
        """The latest wrist force reading minus the tool's weight (N): the contact force the sensor feels."""
        return float(np.linalg.norm(self._vals[-1][-1, :3] - self.free_force))

    @property
    def axial_force(self) -> float:
        """The latest wrist force reading's z component minus the tool's weight (N): the force along the insertion
        axis, which a wall's normal force does not reach (only its friction does)."""
        return float(abs(self._vals[-1][-1, 2] - self.free_force[2]))

    def sensor_samples(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        """Sensor readings with timestamps in (t0, t1]: (N,) float64 s, (N, C) float32."""
        ts, vals = np.concatenate(self._ts), np.concatenate(self._vals)
        keep = (ts > t0) & (ts <= t1)
        return ts[keep], vals[keep].astype(np.float32)

    def state_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """The measured pose at `state_rate` from t = 0: (N,) s, (N, 6) mm."""
        ts, pos = np.concatenate(self._ts), np.concatenate(self._state)
        stride = int(round(self.cfg.sensor_rate / self.cfg.state_rate))
        keep = (np.round(ts * self.cfg.sensor_rate).astype(int) % stride == 0) & (ts >= 0)
        return ts[keep], np.concatenate([pos[keep], np.zeros((int(keep.sum()), 3))], axis=1)

    def render(self, view: str) -> np.ndarray:
        """The current scene from camera `view`, (S, S, 3) uint8 (offscreen)."""
        if self._renderer is None:
            s = self.cfg.image_size
            try:
                self._renderer = self.mj.Renderer(self.model, s, s)
            except Exception as e:
                raise RuntimeError(
                    f"MuJoCo could not open an offscreen GL context (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {e}. "
                    "Install Mesa's EGL (apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri), or OSMesa "
                    "(apt-get install libosmesa6) and set MUJOCO_GL=osmesa; import sensorvla.world.contact before "
                    "anything else imports mujoco (the backend is chosen at its first import)"
                ) from e
        if self._rendered_at != self.k:
            self.mj.mj_forward(self.model, self.data)  # kinematics of the current state (sensor rows already kept)
            self._rendered_at = self.k
        self._renderer.update_scene(self.data, camera=view)
        return self._renderer.render().copy()

    def close(self) -> None:
        """Free the renderer's GL context."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # --- expert -----------------------------------------------------------------------------------------------
    def _move(self, goal_xy: np.ndarray, goal_z: float, max_xy: float, max_z: float) -> np.ndarray:
        """A 7-D action stepping the measured tip towards (goal_xy, goal_z), clipped per axis; tool = 1."""
        p = self.pose[:3]
        a = np.zeros(7)
        err = np.asarray(goal_xy) - p[:2]
        a[:2] = err * min(1.0, max_xy / max(float(np.linalg.norm(err)), 1e-9))
        a[2] = np.clip(goal_z - p[2], -max_z, max_z)
        a[6] = 1.0
        return a

    @property
    def seen_target(self) -> np.ndarray:
        """The target x, y as the expert sees it: the true one (+ `aim_offset`), or the workspace centre without
        cameras."""
        return self.target + self.aim_offset if self.expert_vision else np.zeros(2)

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action at the current state (`expert_mode`, `expert_vision`)."""
        raise NotImplementedError


# --- peg in hole ------------------------------------------------------------------------------------------------
class PegInHoleSim(ContactSim):
    """Tight peg-in-hole; the hole's x, y vary per episode (seen only by the cameras)."""

    instructions = (
        "insert the peg into the hole",
        "put the blue peg in the square hole",
        "align the peg over the hole and push it in",
    )
    bottom_visible = True

    def __init__(self, cfg: PegConfig | None = None):
        super().__init__(cfg or PegConfig())

    def xml(self) -> str:
        """The peg scene (`mjscenes.peg_scene_xml`)."""
        c = self.cfg
        return mjscenes.peg_scene_xml(
            image_size=c.image_size,
            timestep=c.timestep,
            peg_radius=c.peg_radius_mm / 1000,
            hole_half_width=c.hole_half_width_mm / 1000,
            bottom_visible=self.bottom_visible,
            kp_xy=c.kp_xy,
            kp_z=c.kp_z,
        )

    def _set_fixture(self, xy_mm: np.ndarray, bottom_depth_mm: float) -> None:
        m, mj = self.model, self.mj
        m.body_pos[mj.mj_name2id(m, mj.mjtObj.mjOBJ_BODY, "fixture")] = [*(xy_mm / 1000.0), 0.0]
        self.bottom_geom = mj.mj_name2id(m, mj.mjtObj.mjOBJ_GEOM, "bottom")
        m.geom_pos[self.bottom_geom, 2] = -(bottom_depth_mm + 1.0) / 1000.0  # the plate is 2 mm thick

    def _draw(self, rng: np.random.Generator) -> None:
        c = self.cfg
        self.target = rng.uniform(-c.target_range_mm, c.target_range_mm, 2)
        self.depth = c.hole_depth_mm
        self._set_fixture(self.target, self.depth)

    @property
    def lateral_error(self) -> float:
        """Tip to hole axis in x-y (mm)."""
        return float(np.linalg.norm(self.pose[:2] - self.target))

    @property
    def insertion(self) -> float:
        """How far the tip is down the hole (mm; negative above it)."""
        return float(-self.pose[2])

    def _holding(self, action: np.ndarray) -> bool:
        return self.insertion >= self.cfg.insert_goal_mm and self.lateral_error <= self.cfg.hole_half_width_mm

    @property
    def success(self) -> bool:
        """The tip is `insert_goal_mm` down the hole."""
        return self.held >= 1

    def info(self) -> dict[str, Any]:
        """Success, insertion depth and lateral error (mm); `depth_ok`: the tip at the goal depth."""
        return {
            "success": self.success,
            "insertion_mm": self.insertion,
            "lateral_error_mm": self.lateral_error,
            "lateral_ok": self.lateral_error <= self.cfg.hole_half_width_mm - self.cfg.peg_radius_mm + 0.5,
            "depth_error_mm": max(0.0, self.cfg.insert_goal_mm - self.insertion),
            "depth_ok": self.insertion >= self.cfg.insert_goal_mm,
        }

    def _approach(self, above_mm: float = 4.0) -> np.ndarray | None:
        """Align over the hole at `above_mm` (lifting first if the tip is stuck beside it); None once aligned."""
        p = self.pose[:3]
        lateral = float(np.linalg.norm(p[:2] - self.seen_target))
        if lateral <= 0.3 or (p[2] < 0 and lateral < self.cfg.hole_half_width_mm):
            return None
        if p[2] < above_mm - 1.0 and lateral > 1.5:  # beside the hole, low: lift before moving sideways
            return self._move(p[:2], above_mm, 0.0, 3.0)
        return self._move(self.seen_target, max(above_mm, min(p[2], 12.0)), 3.0, 3.0)

    def expert_action(self) -> np.ndarray:
        """Align over the hole (cameras), then push down to 2 mm past the goal and stop."""
        a = self._approach()
        if a is not None:
            return a
        goal = -(self.cfg.insert_goal_mm + 2.0)
        a = self._move(self.seen_target, goal, 0.5, 2.5)
        if self.pose[2] <= goal + 1.0:
            a[2], a[6] = 0.0, 0.0
        return a


# --- blind bottom ------------------------------------------------------------------------------------------------
class BlindBottomSim(PegInHoleSim):
    """Seat the peg on a hole bottom that the cameras never see, without pushing hard.

    `expert_mode`: "guarded" (slow in the depth range where the bottom may be, stop at the first force along the
    insertion axis, not the wall's sideways push, and back the setpoint off to a light preload) or "position" (push
    to the deepest possible bottom, never reading the sensor: it always seats, and presses hard unless the bottom
    happens to be the deepest).
    """

    instructions = (
        "seat the peg on the bottom of the hole without pushing hard",
        "insert the peg until it touches the bottom, then stop",
        "put the peg in the hole and rest it on the bottom gently",
    )
    bottom_visible = False
    expert_modes = ("guarded", "position")

    def __init__(self, cfg: BlindBottomConfig | None = None):
        super().__init__(cfg or BlindBottomConfig())

    def _draw(self, rng: np.random.Generator) -> None:
        c = self.cfg
        self.target = rng.uniform(-c.target_range_mm, c.target_range_mm, 2)
        self.depth = float(rng.uniform(*c.depth_range_mm))
        self._set_fixture(self.target, self.depth)

    def _after_substep(self) -> None:
        d, mj = self.data, self.mj
        total = 0.0
        for i in range(d.ncon):
            con = d.contact[i]
            if self.bottom_geom in (con.geom1, con.geom2):
                f = np.zeros(6)
                mj.mj_contactForce(self.model, d, i, f)
                total += f[0]
        self.bottom_force = total
        self.peak_force = max(self.peak_force, total)

    @property
    def seated(self) -> bool:
        """The tip is within `seat_tol_mm` of the bottom."""
        return self.insertion >= self.depth - self.cfg.seat_tol_mm

    def _holding(self, action: np.ndarray) -> bool:
        still = abs(action[2]) < 0.05 and np.linalg.norm(action[:2]) < 0.3
        return still and self.seated and self.bottom_force <= self.cfg.final_force_n

    @property
    def success(self) -> bool:
        """Seated and still for 3 steps under the final force limit, the peak force never over its limit."""
        return self.held >= 3 and self.peak_force <= self.cfg.peak_force_n

    @property
    def failed(self) -> bool:
        """The peak contact force went over its limit."""
        return self.peak_force > self.cfg.peak_force_n

    def info(self) -> dict[str, Any]:
        """Success, seating, the bottom's final and peak contact force (N), depth and lateral error (mm), and
        `depth_ok`: the depth and force conditions of success, whatever the lateral error and stillness."""
        c = self.cfg
        return {
            **super().info(),
            "success": bool(self.success),
            "seated": bool(self.seated),
            "contact_force_n": float(self.bottom_force),
            "peak_force_n": float(self.peak_force),
            "depth_error_mm": abs(self.depth - self.insertion),
            "bottom_depth_mm": self.depth,
            # the touch half of success: seated, pressing under the final limit, the peak never over its limit
            "depth_ok": bool(
                self.seated and self.bottom_force <= c.final_force_n and self.peak_force <= c.peak_force_n
            ),
        }

    def expert_action(self) -> np.ndarray:
        """Align (cameras); descend, slowly where the bottom may be; on contact stop (force-guarded) or push on to
        the deepest possible bottom (position-only)."""
        a = self._approach()
        if a is not None:
            return a
        c, z = self.cfg, self.pose[2]
        if self.expert_mode == "position":  # plans the setpoint, never reads the sensor
            goal, sp = -(c.depth_range_mm[1] + 2.0), self.setpoint[2] * 1000.0
            a = self._move(self.seen_target, z + np.clip(goal - sp, -2.5, 2.5), 0.5, 2.5)
            if sp <= goal + 1e-6:
                a[2], a[6] = 0.0, 0.0
            return a
        if self.last_action[6] == 0.0 and z < 0:  # holding after contact
            return np.zeros(7)
        force = self.axial_force  # guarded along the insertion axis: the wall's normal force is not the bottom
        if force > 1.0 and z < -(c.depth_range_mm[0] - 1.5):
            a = np.zeros(7)
            a[2] = min(2.0, (force - 0.5) / (c.kp_z / 1000.0))  # back the setpoint off to a 0.5 N preload
            return a
        speed = 0.8 if z < -(c.depth_range_mm[0] - 2.0) else 2.5
        return self._move(self.seen_target, -(c.depth_range_mm[1] + 3.0), 0.5, speed)


# --- layered needle ----------------------------------------------------------------------------------------------
class NeedleSim(ContactSim):
    """Layered needle insertion: enter at the green mark (cameras), puncture the membranes down to `target_layer`
    (the sensor: each membrane's rising force and its drop at puncture; the A-scan's reflections ahead of the tip)
    and stop before the next one.

    The tissue never collides: its forces come from a 1-D layered model applied to the needle at the tip each physics
    step (axial: the first intact membrane's deflection force, friction along the inserted shaft; lateral: a spring
    around the entry point), so the wrist sensor feels them as it would a real tissue's.
    """

    instructions = (
        "insert the needle at the green mark and stop in the layer under the second membrane",
        "pierce the tissue at the mark, pass two membranes and stop",
        "needle into the mark, stop after the second membrane pops",
    )
    expert_modes = ("expert", "sensor_blind")

    def __init__(self, cfg: NeedleConfig | None = None):
        super().__init__(cfg or NeedleConfig())
        self.membranes = np.zeros(4)

    @property
    def sensor_channels(self) -> int:
        """Force/torque, then the A-scan bins."""
        return FT_CHANNELS + self.cfg.ascan_bins

    def sensor_names(self) -> list[str]:
        """Force/torque names, then `ascan_<i>` (bin i covers i * range / (bins - 1) mm ahead of the tip)."""
        return [*super().sensor_names(), *(f"ascan_{i}" for i in range(self.cfg.ascan_bins))]

    def xml(self) -> str:
        """The needle scene (`mjscenes.needle_scene_xml`)."""
        c = self.cfg
        return mjscenes.needle_scene_xml(
            image_size=c.image_size,
            timestep=c.timestep,
            kp_xy=c.kp_xy,
            kp_z=c.kp_z,
            mark_radius=c.mark_radius_mm / 1000,
        )

    def _draw(self, rng: np.random.Generator) -> None:
        c, m, mj = self.cfg, self.model, self.mj
        self.target = rng.uniform(-c.target_range_mm, c.target_range_mm, 2)
        first = rng.uniform(*c.first_depth_mm)
        gaps = rng.uniform(*c.gap_mm, size=len(c.stiffness_n_per_mm) - 2)
        self.membranes = np.concatenate([[0.0, first], first + np.cumsum(gaps)])
        self.depth = float(self.membranes[c.target_layer])
        m.body_pos[mj.mj_name2id(m, mj.mjtObj.mjOBJ_BODY, "entry")] = [*(self.target / 1000.0), 0.0]
        self.tool_body = mj.mj_name2id(m, mj.mjtObj.mjOBJ_BODY, "tool")
        self.punctured = 0  # membranes 0 .. punctured - 1 are punctured (in order)
        self.entry_xy: np.ndarray | None = None
        self.tissue_force = np.zeros(3)
        self.peak_force = 0.0
        self._punct_log: list[int] = []

    def _substep(self) -> None:
        c, d = self.cfg, self.data
        tip, vz = d.qpos[:3] * 1000.0, d.qvel[2] * 1000.0
        depth = -tip[2]
        force = np.zeros(3)
        j = self.punctured
        if j < len(self.membranes) and depth > self.membranes[j]:
            axial = c.stiffness_n_per_mm[j] * (depth - self.membranes[j])
            force[2] += axial
            if axial >= c.puncture_n[j]:
                self.punctured += 1
                if j == 0:
                    self.entry_xy = tip[:2].copy()
        if self.punctured and depth > 0:
            force[2] -= c.friction_n_per_mm * depth * np.tanh(vz / 2.0)
            force[:2] -= c.lateral_n_per_mm * (tip[:2] - self.entry_xy) * min(1.0, depth / 3.0)
        self.tissue_force = force
        lever = d.qpos[:3] - d.xipos[self.tool_body]  # the tip relative to the needle's centre of mass (m)
        d.xfrc_applied[self.tool_body] = [*force, *np.cross(lever, force)]

    def _after_substep(self) -> None:
        self._punct_log.append(self.punctured)
        self.peak_force = max(self.peak_force, float(np.linalg.norm(self.tissue_force)))

    def _extend_readings(self, ft: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Force/torque + the A-scan: a reflection at each intact membrane ahead of the tip (at the tip while it
        is deflected), the surface while above it, and the tissue's decaying backscatter."""
        c = self.cfg
        depth = -state[:, 2] * 1000.0  # (N,) tip depth (mm)
        punct = np.asarray(self._punct_log[-len(depth) :])
        bins = np.linspace(0.0, c.ascan_range_mm, c.ascan_bins)[None, :]
        amp = np.array([0.6, 1.0, 1.2, 1.4])
        ascan = np.where(bins > -depth[:, None], 0.2 * np.exp(-(bins + np.minimum(depth, 0)[:, None]) / 6.0), 0.0)
        for i, d_i in enumerate(self.membranes):
            ahead = np.maximum(d_i - depth, 0.0)[:, None]
            intact = (punct <= i)[:, None]
            ascan = ascan + intact * amp[i] * np.exp(-((bins - ahead) ** 2) / 0.05)
        ascan = ascan + self.noise_rng.normal(0, c.ascan_noise, ascan.shape)
        return np.concatenate([ft, ascan], axis=1)

    @property
    def lateral_error(self) -> float:
        """The entry point's (before entry: the tip's) x-y distance to the mark (mm)."""
        xy = self.pose[:2] if self.entry_xy is None else self.entry_xy
        return float(np.linalg.norm(xy - self.target))

    @property
    def layer_distance(self) -> float:
        """The tip's distance above the next membrane under the target layer (mm; negative: pressing into it)."""
        return float(self.membranes[self.cfg.target_layer + 1] + self.pose[2])

    @property
    def layer_middle(self) -> float:
        """The target layer's middle depth (mm)."""
        t = self.cfg.target_layer
        return float(self.membranes[t] + self.membranes[t + 1]) / 2

    def _blind_descent(self, depth: float, a: np.ndarray) -> np.ndarray:
        c = self.cfg
        first, gap = np.mean(c.first_depth_mm), np.mean(c.gap_mm)
        goal = first + (c.target_layer - 1) * gap + gap / 3  # where the expert stops on average
        a[2] = -np.clip(goal - depth, 0.0, 1.0 if goal - depth > 1.5 else 0.4)
        a[6] = 0.0 if goal - depth < 0.3 else 1.0
        if a[6] == 0.0:
            a[2] = 0.0
        return a

    def _holding(self, action: np.ndarray) -> bool:
        still = abs(action[2]) < 0.05 and np.linalg.norm(action[:2]) < 0.3
        in_layer = self.punctured == self.cfg.target_layer + 1 and self.layer_distance >= -0.2
        return still and in_layer and self.lateral_error <= self.cfg.lateral_tol_mm

    @property
    def failed(self) -> bool:
        """The membrane under the target layer is punctured."""
        return self.punctured > self.cfg.target_layer + 1

    def info(self) -> dict[str, Any]:
        """Success, punctured membranes, the distance to the next membrane, lateral error (mm), peak force (N), and
        `depth_ok`: the depth condition of success (in the target layer), whatever the entry point and stillness."""
        return {
            "success": bool(self.success),
            "punctured": int(self.punctured),
            "layer_distance_mm": self.layer_distance,
            "depth_error_mm": abs(-self.pose[2] - self.layer_middle),
            "lateral_error_mm": self.lateral_error,
            "lateral_ok": self.lateral_error <= self.cfg.lateral_tol_mm,
            "peak_force_n": self.peak_force,
            "layer_depth_mm": self.depth,
            # the touch half of success: in the target layer, the next membrane neither punctured nor pressed
            "depth_ok": bool(self.punctured == self.cfg.target_layer + 1 and self.layer_distance >= -0.2),
        }

    def expert_action(self) -> np.ndarray:
        """Align over the mark at 3 mm (cameras); enter; approach each membrane slowly once it is within 1.5 mm
        (the A-scan shows it) until it pops (the force drops); after the target membrane, move to a third of the
        layer and stop."""
        c, p = self.cfg, self.pose[:3]
        depth, n = -p[2], self.punctured
        lateral = float(np.linalg.norm(p[:2] - self.seen_target))
        if lateral > 0.25 and depth < -0.5:
            return self._move(self.seen_target, max(3.0, min(p[2], 10.0)), 3.0, 3.0)
        a = np.zeros(7)
        a[6] = 1.0
        if self.expert_mode == "sensor_blind":  # the layer at its mean depth, never reading the sensor
            return self._blind_descent(depth, a)
        if n == 0:
            return self._move(self.seen_target, p[2] - (1.5 if depth < -1.0 else 0.4), 0.3, 1.5)
        if n <= c.target_layer:
            ahead = self.membranes[n] - depth
            a[2] = -(1.0 if ahead > 1.5 else 0.25)
            return a
        if self.last_action[6] == 0.0:  # holding in the layer
            return np.zeros(7)
        top, bottom = self.membranes[c.target_layer], self.membranes[c.target_layer + 1]
        goal = top + max(0.33 * (bottom - top), 1.0)
        a[2] = np.clip(depth - goal, -0.25, 0.25)
        if abs(depth - goal) < 0.3 or depth > goal:
            a[2] = 0.0 if depth <= goal + 0.3 else a[2]
            a[6] = 0.0 if a[2] == 0.0 else 1.0
        return a


TASKS: dict[str, tuple[type[ContactSim], type[ContactConfig]]] = {
    "peg_in_hole": (PegInHoleSim, PegConfig),
    "blind_bottom": (BlindBottomSim, BlindBottomConfig),
    "needle": (NeedleSim, NeedleConfig),
}
