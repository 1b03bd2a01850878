"""The embedded synthetic insertion task: a simulator (reused by the closed-loop Gymnasium env) and a
deterministic dataset generator (the demo's data and the tests' fixture).

A needle moves laterally to a visible target mark (aligning its yaw with the mark), then descends into a
tissue block. A hidden layer lies at a random depth under the surface: it is NOT drawn in the images, but
it shows in the A-scan (a reflection peak at the tip-to-layer distance) and in force (rises on contact).
The expert slows down near the layer and stops on it, so the right z motion needs the sensor.

Units: mm and degrees; actions are per-100 ms deltas (10 Hz): [dx, dy, dz, droll, dpitch, dyaw, tool],
where tool is 1.0 while the needle is being driven and 0.0 once it holds at the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sensorvla.data.types import EpisodeData, ImageStream

ACTION_DT = 0.1
INSTRUCTIONS = [
    "insert the needle and stop at the hidden layer",
    "pierce the membrane at the target mark",
    "approach the target mark and insert until contact",
]


@dataclass
class SimConfig:
    """Simulator constants (mm, deg, Hz)."""

    image_size: int = 64
    sensor_rate: float = 650.0
    sensor_channels: int = 33  # 1 force + (C - 1) A-scan depth bins
    ascan_range_mm: float = 8.0  # depth covered ahead of the tip
    camera_rate: float = 5.0
    state_rate: float = 100.0
    max_steps: int = 90
    success_tol_mm: float = 0.35
    overshoot_fail_mm: float = 1.2


class InsertionSim:
    """One episode of the insertion task. `step(action)` advances 100 ms.

    State: pose = [x, y, z, roll, pitch, yaw]; z = 0 is the tissue surface, the layer is at z = -depth.
    """

    def __init__(self, seed: int, cfg: SimConfig | None = None):
        self.cfg = cfg or SimConfig()
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        r = self.rng
        self.target = r.uniform(-8, 8, size=2)
        self.target_yaw = r.uniform(-30, 30)
        self.depth = r.uniform(2.0, 6.0)  # hidden
        self.pose = np.array([*r.uniform(-8, 8, size=2), r.uniform(6, 12), 0.0, 0.0, r.uniform(-30, 30)])
        self.t = 0.0
        self.steps = 0
        self.held = 0
        self.trajectory = [(0.0, self.pose.copy())]

    # --- physics and sensing --------------------------------------------------------------------------
    @property
    def layer_distance(self) -> float:
        """Tip-to-layer distance (mm, > 0 above the layer)."""
        return float(self.pose[2] + self.depth)

    def pose_at(self, t: float) -> np.ndarray:
        """Pose at time t (linear between the 100 ms action steps)."""
        times = np.array([p[0] for p in self.trajectory])
        poses = np.stack([p[1] for p in self.trajectory])
        return np.array([np.interp(t, times, poses[:, k]) for k in range(6)])

    def sensor_values(self, z_tip: np.ndarray) -> np.ndarray:
        """(N,) tip heights -> (N, C) [force, A-scan bins] readings (noise-free part)."""
        c = self.cfg
        n_bins = c.sensor_channels - 1
        dist_layer = z_tip + self.depth
        penetration_surface = np.clip(-z_tip, 0, None)
        penetration_layer = np.clip(-dist_layer, 0, None)
        force = 0.15 * penetration_surface + 2.5 * penetration_layer + 0.8 * np.exp(-np.abs(dist_layer) / 0.15)
        bins = np.linspace(0, c.ascan_range_mm, n_bins)[None, :]
        surface_peak = np.where(z_tip[:, None] > 0, 0.6 * np.exp(-((bins - z_tip[:, None]) ** 2) / 0.08), 0.0)
        layer_peak = 1.5 * np.exp(-((bins - dist_layer[:, None]) ** 2) / 0.05)
        tissue = np.where(bins > np.maximum(z_tip[:, None], 0), 0.2 * np.exp(-bins / 6), 0.0)
        return np.concatenate([force[:, None], surface_peak + layer_peak + tissue], axis=1)

    def sensor_samples(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        """Sensor samples with timestamps in (t0, t1] on the sensor's nominal grid with jitter."""
        rate = self.cfg.sensor_rate
        k0, k1 = int(np.floor(t0 * rate)) + 1, int(np.floor(t1 * rate))
        if k1 < k0:
            return np.zeros(0), np.zeros((0, self.cfg.sensor_channels), np.float32)
        k = np.arange(k0, k1 + 1)
        ts = k / rate + self.rng.uniform(0, 0.3 / rate, size=len(k))
        ts = ts[(ts > t0) & (ts <= t1)]
        z = (
            np.array([self.pose_at(t)[2] for t in ts])
            if len(ts) < 8
            else np.interp(ts, [p[0] for p in self.trajectory], [p[1][2] for p in self.trajectory])
        )
        vals = self.sensor_values(z) + self.rng.normal(0, 0.03, size=(len(ts), self.cfg.sensor_channels))
        return ts, vals.astype(np.float32)

    def render(self, view: str, pose: np.ndarray | None = None) -> np.ndarray:
        """uint8 (S, S, 3): 'front' (x-z: tissue surface, needle) or 'top' (x-y: target mark, needle)."""
        s = self.cfg.image_size
        pose = self.pose if pose is None else pose
        img = np.full((s, s, 3), 235, np.uint8)
        yy, xx = np.mgrid[0:s, 0:s]
        to_px = lambda v, lo, hi: (v - lo) / (hi - lo) * (s - 1)  # noqa: E731
        if view == "front":
            surf = int(round(to_px(-0.0, 14, -8)))
            img[surf:, :] = (205, 150, 140)  # tissue block; the hidden layer is not drawn
            px, pz = to_px(pose[0], -12, 12), to_px(pose[2], 14, -8)
            shaft = (np.abs(xx - px) < 1.2) & (yy <= pz)
            img[shaft] = (40, 40, 60)
            tgt = int(round(to_px(self.target[0], -12, 12)))
            img[max(surf - 2, 0) : surf, max(tgt - 1, 0) : tgt + 2] = (30, 160, 30)
        else:
            tx, ty = to_px(self.target[0], -12, 12), to_px(self.target[1], -12, 12)
            ang = np.deg2rad(self.target_yaw)
            u, v = xx - tx, yy - ty
            along, across = u * np.cos(ang) + v * np.sin(ang), -u * np.sin(ang) + v * np.cos(ang)
            img[(np.abs(along) < 6) & (np.abs(across) < 1.0)] = (30, 160, 30)
            nx, ny = to_px(pose[0], -12, 12), to_px(pose[1], -12, 12)
            na = np.deg2rad(pose[5])
            u, v = xx - nx, yy - ny
            along, across = u * np.cos(na) + v * np.sin(na), -u * np.sin(na) + v * np.cos(na)
            img[(np.abs(along) < 4) & (np.abs(across) < 0.8)] = (40, 40, 60)
            shade = int(np.clip(200 - 10 * pose[2], 60, 255))  # height shows as the dot's shade
            img[(u**2 + v**2) < 3] = (shade, 60, 60)
        return img

    # --- control -----------------------------------------------------------------------------------
    def expert_action(self) -> np.ndarray:
        """The demonstrator: align laterally, descend, slow near the layer (sensor-visible), stop on it."""
        a = np.zeros(7)
        err = self.target - self.pose[:2]
        yaw_err = self.target_yaw - self.pose[5]
        lateral = np.linalg.norm(err)
        if lateral > 0.3 or abs(yaw_err) > 2.0:
            a[:2] = err * min(1.0, 1.0 / max(lateral, 1e-6))
            a[5] = np.clip(yaw_err, -6, 6)
            a[6] = 1.0
            return a
        d = self.layer_distance
        if d > 2.0:
            a[2] = -0.8
        elif d > 0.1:
            a[2] = -max(0.1, 0.35 * d)
        elif d < -0.1:
            a[2] = min(0.5, -d)  # retract after an overshoot
        a[6] = 1.0 if abs(d) > 0.1 else 0.0
        return a

    def step(self, action: np.ndarray) -> None:
        self.pose = self.pose + np.asarray(action[:6], dtype=np.float64)
        self.t += ACTION_DT
        self.steps += 1
        self.trajectory.append((self.t, self.pose.copy()))
        stopped = abs(action[2]) < 0.05 and np.linalg.norm(action[:2]) < 0.05
        self.held = self.held + 1 if stopped and abs(self.layer_distance) <= self.cfg.success_tol_mm else 0

    @property
    def success(self) -> bool:
        return self.held >= 3

    @property
    def failed(self) -> bool:
        return self.layer_distance < -self.cfg.overshoot_fail_mm or self.steps >= self.cfg.max_steps


def simulate_episode(
    seed: int, cfg: SimConfig, *, with_sensor: bool, name: str, hold_steps: int = 5, action_noise: float = 0.03
) -> EpisodeData:
    """Run the expert (with small execution noise) and record every stream at its own rate and clock."""
    sim = InsertionSim(seed, cfg)
    noise_rng = np.random.default_rng(seed + 7919)
    actions = []
    while len(actions) < cfg.max_steps:
        a = sim.expert_action()
        a[:6] += noise_rng.normal(0, action_noise, size=6) * (np.abs(a[:6]) > 0)
        actions.append(a)
        sim.step(a)
        if sim.success:
            for _ in range(hold_steps):
                a = sim.expert_action()
                actions.append(a)
                sim.step(a)
            break
    t_end = sim.t
    action_ts = np.arange(len(actions)) * ACTION_DT
    state_ts = np.arange(0, t_end + 1e-9, 1 / cfg.state_rate)
    state = np.stack([sim.pose_at(t) for t in state_ts]).astype(np.float32)
    # cameras lag the common clock by a fixed, recorded offset
    cam_offset = 0.013
    cam_true = np.arange(0, t_end + 1e-9, 1 / cfg.camera_rate) + 0.004
    images = {
        v: ImageStream(cam_true - cam_offset, np.stack([sim.render(v, sim.pose_at(t)) for t in cam_true]))
        for v in ("front", "top")
    }
    sensor_ts = sensor = None
    if with_sensor:
        sensor_ts, sensor = sim.sensor_samples(-0.2, t_end)
    offsets = {"image.front": cam_offset, "image.top": cam_offset}
    return EpisodeData(
        name=name,
        instruction=INSTRUCTIONS[seed % len(INSTRUCTIONS)],
        action_timestamps=action_ts,
        actions=np.asarray(actions, np.float32),
        state_timestamps=state_ts,
        state=state,
        images=images,
        sensor_timestamps=sensor_ts,
        sensor=sensor,
        clock_offsets=offsets,
        extra={"layer_depth_mm": float(sim.depth), "success": bool(sim.success)},
    )


def generate_dataset(
    out_dir: str | Path,
    *,
    num_episodes: int = 24,
    seed: int = 0,
    sensor_channels: int = 33,
    sensor_rate: float = 650.0,
    image_size: int = 64,
    no_sensor_fraction: float = 0.2,
    progress: bool = True,
    overwrite: bool = True,
) -> Path:
    """Write the synthetic insertion dataset (deterministic for `seed`) in the native format."""
    from sensorvla.data.format import write_dataset

    cfg = SimConfig(image_size=image_size, sensor_rate=sensor_rate, sensor_channels=sensor_channels)
    rng = np.random.default_rng(seed)
    no_sensor = set(
        rng.choice(num_episodes, size=int(round(no_sensor_fraction * num_episodes)), replace=False).tolist()
    )
    episodes = (
        simulate_episode(seed * 100_003 + e, cfg, with_sensor=e not in no_sensor, name=f"synth_{e:04d}")
        for e in range(num_episodes)
    )
    return write_dataset(
        episodes,
        out_dir,
        dataset_id=f"synthetic_insertion_s{seed}_n{num_episodes}",
        action_fps=1 / ACTION_DT,
        min_actions=8,
        overwrite=overwrite,
        progress=progress,
        extra_info={
            "sensor_rate": sensor_rate,
            "force_channels": 1,
            "state_rate": cfg.state_rate,
            "camera_rate": cfg.camera_rate,
            "action_semantics": "per-100ms pose deltas [dx,dy,dz mm; droll,dpitch,dyaw deg unwrapped; tool]",
        },
    )
