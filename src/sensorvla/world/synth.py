"""The embedded synthetic insertion task: a simulator (reused by the closed-loop Gymnasium env) and a
deterministic dataset generator (the demo's data and the tests' fixture).

A needle must (1) move laterally onto a target disc whose position varies per episode and is visible
ONLY in the cameras (the state holds the needle pose, never the target), then (2) descend into a tissue
block and stop on a hidden layer whose depth varies per episode and is visible ONLY to the sensor (a
reflection peak in the A-scan at the tip-to-layer distance, and force on contact; the layer is never
drawn). Success needs both senses: the tip holds on the layer within `success_tol_mm` while the lateral
error to the target is within `lateral_tol_mm`. `task="contact"` keeps the older contact-only scoring
(lateral error reported, not scored).

Units: mm and degrees; actions are per-100 ms deltas (10 Hz): [dx, dy, dz, droll, dpitch, dyaw, tool],
where tool is 1.0 while the needle is being driven and 0.0 once it holds at the layer. Demonstrations are
recorded DART-style: the executed motion carries a small perturbation, the recorded action is the
expert's (clean) command at the visited state, so the data shows how to recover from small errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sensorvla.data.types import EpisodeData, Stream

ACTION_DT = 0.1
INSTRUCTIONS = [
    "insert the needle at the target and stop at the hidden layer",
    "move onto the green target, then pierce down to the layer",
    "align with the target mark and insert until contact",
]
WORKSPACE_MM = 12.0  # the cameras see [-12, 12] mm laterally


@dataclass
class SimConfig:
    """Simulator constants (mm, deg, Hz)."""

    image_size: int = 112
    sensor_rate: float = 650.0
    sensor_channels: int = 33  # 1 force + (C - 1) A-scan depth bins
    ascan_range_mm: float = 8.0  # depth covered ahead of the tip
    camera_rate: float = 5.0  # slower than the 10 Hz actions, as on real robots: frames are reused
    state_rate: float = 100.0
    max_steps: int = 110
    success_tol_mm: float = 0.35  # |tip - layer| while holding
    lateral_tol_mm: float = 1.5  # |tip - target| in x-y at success: on the inner part of the disc
    overshoot_fail_mm: float = 1.2
    target_range_mm: float = 7.0  # target and start x, y ~ U(-range, range)
    target_radius_mm: float = 2.0
    task: Literal["align_insert", "contact"] = "align_insert"


class InsertionSim:
    """One episode of the insertion task. `step(action)` advances 100 ms.

    State: pose = [x, y, z, roll, pitch, yaw]; z = 0 is the tissue surface, the layer is at z = -depth.
    """

    def __init__(self, seed: int, cfg: SimConfig | None = None):
        self.cfg = cfg or SimConfig()
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        """Draw a new target and layer depth and put the needle at its start pose."""
        r, c = self.rng, self.cfg
        self.target = r.uniform(-c.target_range_mm, c.target_range_mm, size=2)
        self.depth = r.uniform(2.0, 6.0)  # hidden from the cameras
        start = r.uniform(-c.target_range_mm, c.target_range_mm, size=2)
        self.pose = np.array([*start, r.uniform(5, 10), 0.0, 0.0, 0.0])
        self.t = 0.0
        self.steps = 0
        self.held = 0
        self.trajectory = [(0.0, self.pose.copy())]

    # --- physics and sensing --------------------------------------------------------------------------
    @property
    def layer_distance(self) -> float:
        """Tip-to-layer distance (mm, > 0 above the layer)."""
        return float(self.pose[2] + self.depth)

    @property
    def lateral_error(self) -> float:
        """Tip-to-target distance in the x-y plane (mm)."""
        return float(np.linalg.norm(self.target - self.pose[:2]))

    def pose_at(self, t: float | np.ndarray) -> np.ndarray:
        """Pose at time t, (6,) (or (N, 6) for an array of times): linear between the 100 ms steps."""
        times = np.array([p[0] for p in self.trajectory])
        poses = np.stack([p[1] for p in self.trajectory])
        tt = np.atleast_1d(np.asarray(t, np.float64))
        out = np.stack([np.interp(tt, times, poses[:, k]) for k in range(6)], axis=-1)
        return out if np.ndim(t) else out[0]

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
        z = np.interp(ts, [p[0] for p in self.trajectory], [p[1][2] for p in self.trajectory])
        vals = self.sensor_values(z) + self.rng.normal(0, 0.03, size=(len(ts), self.cfg.sensor_channels))
        return ts, vals.astype(np.float32)

    def tactile_samples(self, t0: float, t1: float, rng: np.random.Generator, rate: float = 100.0, size: int = 4):
        """A size x size tactile array at the tip, `rate` Hz in (t0, t1]: a pressure blob centred on the tip's
        offset from the target (so it says where, like a real pad), scaled by the penetration. (ts, (N, s, s))."""
        ts = np.arange(np.floor(t0 * rate) + 1, np.floor(t1 * rate) + 1) / rate
        pose = np.atleast_2d(self.pose_at(ts))
        press = np.clip(-pose[:, 2], 0, None)[:, None, None]
        grid = np.linspace(-1.5, 1.5, size)
        dx = (pose[:, 0] - self.target[0])[:, None, None] / 4 - grid[None, None, :]
        dy = (pose[:, 1] - self.target[1])[:, None, None] / 4 - grid[None, :, None]
        vals = press * np.exp(-(dx**2 + dy**2)) + rng.normal(0, 0.01, size=(len(ts), size, size))
        return ts, vals.astype(np.float32)

    def imu_samples(self, t0: float, t1: float, rng: np.random.Generator, rate: float = 1000.0):
        """A 6-axis IMU on the tool at `rate` Hz in (t0, t1]: accel (m/s^2, gravity + the motion's acceleration + a
        vibration while the tip cuts the layer) and gyro (rad/s). (ts, (N, 6))."""
        ts = np.arange(np.floor(t0 * rate) + 1, np.floor(t1 * rate) + 1) / rate
        pose = np.atleast_2d(self.pose_at(ts))
        vel = np.gradient(pose, 1 / rate, axis=0) if len(ts) > 1 else np.zeros_like(pose)
        acc = (np.gradient(vel[:, :3], 1 / rate, axis=0) if len(ts) > 1 else vel[:, :3]) * 1e-3
        cutting = np.exp(-np.abs(pose[:, 2] + self.depth) / 0.2)[:, None]
        acc = acc + [0.0, 0.0, 9.81] + cutting * np.sin(2 * np.pi * 180 * ts)[:, None] * 0.5
        gyro = np.deg2rad(vel[:, 3:])
        vals = np.concatenate([acc, gyro], axis=1) + rng.normal(0, 0.02, size=(len(ts), 6))
        return ts, vals.astype(np.float32)

    def render(self, view: str, pose: np.ndarray | None = None) -> np.ndarray:
        """uint8 (S, S, 3). 'top' (x-y): the green target disc and the needle tip, whose shade and shadow
        offset show its height. 'front' (x-z): the tissue surface, the needle shaft and the target's x as a
        green mark on the surface. The hidden layer is drawn in neither."""
        s = self.cfg.image_size
        pose = self.pose if pose is None else pose
        img = np.full((s, s, 3), 235, np.uint8)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        px_per_mm = (s - 1) / (2 * WORKSPACE_MM)
        to_px = lambda v: (v + WORKSPACE_MM) * px_per_mm  # noqa: E731  lateral mm -> px
        if view == "top":
            tx, ty = to_px(self.target[0]), to_px(self.target[1])
            r_t = self.cfg.target_radius_mm * px_per_mm
            img[(xx - tx) ** 2 + (yy - ty) ** 2 <= r_t**2] = (30, 170, 30)
            nx, ny = to_px(pose[0]), to_px(pose[1])
            height = max(float(pose[2]), 0.0)
            sx, sy = nx + 0.25 * height * px_per_mm, ny + 0.25 * height * px_per_mm  # shadow
            img[(xx - sx) ** 2 + (yy - sy) ** 2 <= (0.6 * px_per_mm) ** 2] = (150, 150, 150)
            shade = int(np.clip(40 + 12 * height, 40, 200))
            img[(xx - nx) ** 2 + (yy - ny) ** 2 <= (0.7 * px_per_mm) ** 2] = (shade, 30, 30)
        else:
            z_to_px = lambda z: (14.0 - z) / 22.0 * (s - 1)  # noqa: E731  z in [14, -8] mm -> rows
            surf = int(round(z_to_px(0.0)))
            img[surf:, :] = (205, 150, 140)  # tissue block; the hidden layer is not drawn
            tx = int(round(to_px(self.target[0])))
            img[max(surf - 3, 0) : surf, max(tx - 2, 0) : tx + 3] = (30, 170, 30)
            nx, nz = to_px(pose[0]), z_to_px(pose[2])
            img[(np.abs(xx - nx) < 1.3) & (yy <= nz)] = (40, 40, 60)
        return img

    # --- control -----------------------------------------------------------------------------------
    def expert_action(self) -> np.ndarray:
        """The demonstrator: servo onto the target (vision), descend once aligned, slow near the layer
        (sensor) and stop on it. Lateral servoing continues during the descent."""
        a = np.zeros(7)
        err = self.target - self.pose[:2]
        lateral = float(np.linalg.norm(err))
        a[:2] = err * min(1.0, 1.0 / max(lateral, 1e-6)) if lateral > 0.15 else 0.0
        a[6] = 1.0
        if self.cfg.task == "align_insert" and lateral > 0.5 and self.pose[2] > 0.5:
            return a  # align above the surface before entering the tissue
        d = self.layer_distance
        if d > 2.0:
            a[2] = -0.8
        elif d > 0.1:
            a[2] = -max(0.1, 0.35 * d)
        elif d < -0.1:
            a[2] = min(0.5, -d)  # retract after an overshoot
        a[6] = 1.0 if abs(d) > 0.1 or lateral > 0.15 else 0.0
        return a

    def step(self, action: np.ndarray, perturbation: np.ndarray | None = None) -> None:
        """Apply a commanded action (plus an optional execution perturbation, DART) for 100 ms."""
        delta = np.asarray(action[:6], dtype=np.float64)
        if perturbation is not None:
            delta = delta + perturbation
        self.pose = self.pose + delta
        self.t += ACTION_DT
        self.steps += 1
        self.trajectory.append((self.t, self.pose.copy()))
        stopped = abs(action[2]) < 0.05 and np.linalg.norm(action[:2]) < 0.3
        on_layer = abs(self.layer_distance) <= self.cfg.success_tol_mm
        aligned = self.cfg.task == "contact" or self.lateral_error <= self.cfg.lateral_tol_mm
        self.held = self.held + 1 if stopped and on_layer and aligned else 0

    @property
    def success(self) -> bool:
        """True once the tip has held on the layer (and on the target) for three steps."""
        return self.held >= 3

    @property
    def failed(self) -> bool:
        """True when the tip overshot the layer or the step budget ran out."""
        return self.layer_distance < -self.cfg.overshoot_fail_mm or self.steps >= self.cfg.max_steps


def simulate_episode(
    seed: int,
    cfg: SimConfig,
    *,
    with_sensor: bool,
    name: str,
    hold_steps: int = 5,
    lateral_noise_mm: float = 0.12,
    depth_noise_mm: float = 0.03,
    extra_streams: tuple[str, ...] = (),
) -> EpisodeData:
    """Run the expert and record every stream at its own rate and clock.

    Execution is perturbed (Gaussian, per step: `lateral_noise_mm` in x-y, `depth_noise_mm` in z) while the
    recorded action is the expert's clean command at the visited state (DART), so the demonstrations
    cover the small errors a learned policy makes and show their correction. `extra_streams`: also record
    "tactile" (4 x 4 at 100 Hz) and/or "imu" (6-axis at 1 kHz), from their own RNG (the other streams are unchanged).
    """
    sim = InsertionSim(seed, cfg)
    noise_rng = np.random.default_rng(seed + 7919)
    actions = []
    scale = np.array([lateral_noise_mm, lateral_noise_mm, depth_noise_mm, 0, 0, 0])
    while len(actions) < cfg.max_steps:
        a = sim.expert_action()
        actions.append(a)
        sim.step(a, perturbation=noise_rng.normal(0, 1, size=6) * scale)
        if sim.success:
            for _ in range(hold_steps):
                a = sim.expert_action()
                actions.append(a)
                sim.step(a)
            break
    t_end = sim.t
    action_ts = np.arange(len(actions)) * ACTION_DT
    state_ts = np.arange(0, t_end + 1e-9, 1 / cfg.state_rate)
    state = sim.pose_at(state_ts).astype(np.float32)
    # camera frames are exposed 4 ms before each control tick; their clock lags the common clock by a
    # fixed, recorded offset
    cam_offset = 0.013
    cam_true = np.arange(0, t_end + 1e-9, 1 / cfg.camera_rate) - 0.004
    streams = {"action": Stream(action_ts, np.asarray(actions, np.float32)), "state": Stream(state_ts, state)}
    for v in ("front", "top"):
        frames = np.stack([sim.render(v, p) for p in sim.pose_at(cam_true)])
        streams[f"image.{v}"] = Stream(cam_true - cam_offset, frames, cam_offset)
    if with_sensor:
        streams["sensor"] = Stream(*sim.sensor_samples(-0.2, t_end))
    target = [float(v) for v in sim.target]
    extra = {"layer_depth_mm": float(sim.depth), "target_mm": target, "success": bool(sim.success)}
    ep = EpisodeData.from_streams(name, INSTRUCTIONS[seed % len(INSTRUCTIONS)], streams, extra)
    rng = np.random.default_rng(seed + 104_729)
    for key in extra_streams if with_sensor else ():
        ep.sensor_streams[key] = Stream(*getattr(sim, f"{key}_samples")(-0.2, t_end, rng))
    return ep


EXTRA_STREAMS = {"tactile": "taxel2d", "imu": "imu"}  # the synthetic world's other sensors and their encoders


def _simulate_one(job: tuple[int, bool, str], cfg: SimConfig, extra_streams: tuple[str, ...] = ()) -> EpisodeData:
    seed, with_sensor, name = job
    return simulate_episode(seed, cfg, with_sensor=with_sensor, name=name, extra_streams=extra_streams)


def _simulate_in_processes(jobs: list[tuple[int, bool, str]], cfg: SimConfig, workers: int, extra=()):
    """simulate_episode over `jobs` in `workers` spawned processes, yielded in order, at most 2 per worker
    ahead of the consumer (an episode's frames are a few MB)."""
    import collections
    import copy
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        todo, pending = iter(jobs), collections.deque()
        for job in todo:
            pending.append(pool.submit(_simulate_one, job, cfg, extra))
            if len(pending) >= 2 * workers:
                break
        while pending:
            # a copy in this process's own memory: unpickled arrays sit in the pickle's bytes (unaligned), and the
            # files must not depend on where a frame's pixels are (they are compared byte for byte with serial)
            episode = copy.deepcopy(pending.popleft().result())
            job = next(todo, None)
            if job is not None:
                pending.append(pool.submit(_simulate_one, job, cfg, extra))
            yield episode


def generate_dataset(
    out_dir: str | Path,
    *,
    num_episodes: int = 24,
    seed: int = 0,
    sensor_channels: int = 33,
    sensor_rate: float = 650.0,
    image_size: int = 112,
    task: str = "align_insert",
    no_sensor_fraction: float = 0.2,
    progress: bool = True,
    overwrite: bool = True,
    image_format: str = "video",
    workers: int = 0,
    extra_streams: tuple[str, ...] = (),
) -> Path:
    """Write the synthetic insertion dataset (deterministic for `seed`) as a LeRobot v3 dataset (+ sidecar).

    `image_format`: "video" (mp4, LeRobot's default) or "npy" (lossless raw frames). `workers` > 0 simulates
    episodes in that many processes while this one encodes and writes (the same files: each episode depends
    only on its own seed). `extra_streams`: other sensors to record beside force + A-scan ("tactile", "imu"),
    declared in the sidecar with their encoder (`EXTRA_STREAMS`), so training reads them as streams."""
    from sensorvla.data.format import write_dataset

    cfg = SimConfig(image_size=image_size, sensor_rate=sensor_rate, sensor_channels=sensor_channels, task=task)
    rng = np.random.default_rng(seed)
    no_sensor = set(
        rng.choice(num_episodes, size=int(round(no_sensor_fraction * num_episodes)), replace=False).tolist()
    )
    jobs = [(seed * 100_003 + e, e not in no_sensor, f"synth_{e:04d}") for e in range(num_episodes)]
    if workers > 0:
        episodes = _simulate_in_processes(jobs, cfg, workers, tuple(extra_streams))
    else:
        episodes = (_simulate_one(job, cfg, tuple(extra_streams)) for job in jobs)
    return write_dataset(
        episodes,
        out_dir,
        dataset_id=f"synthetic_insertion_{task}_s{seed}_n{num_episodes}_px{image_size}",
        action_fps=1 / ACTION_DT,
        min_actions=8,
        overwrite=overwrite,
        progress=progress,
        image_format=image_format,
        extra_info={
            "sensor_rate": sensor_rate,
            "force_channels": 1,
            "state_rate": cfg.state_rate,
            "camera_rate": cfg.camera_rate,
            "task": task,
            "action_semantics": "per-100ms pose deltas [dx,dy,dz mm; droll,dpitch,dyaw deg unwrapped; tool]",
        }
        | ({"encoders": {k: EXTRA_STREAMS[k] for k in extra_streams}} if extra_streams else {}),
    )
