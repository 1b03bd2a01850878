"""A plain from-scratch CNN behaviour-cloning reference policy, to measure our VLA policies against.

Per camera: 4 conv layers (stride 2 first, GroupNorm, ReLU) and a spatial-softmax keypoint readout; the
robot state and the sensor window (normalized exactly as for the VLA, flattened through an MLP) join
the keypoints in an MLP that predicts the same action chunk (H, D_a), trained with an L1 loss, random
shift augmentation and AdamW for a fixed budget: wall-clock seconds (`budget_s`) and/or CPU-seconds
(`cpu_budget_s`, what `sensorvla bench sim` gives it: exactly our training's). It sees every modality the
VLA sees (`use_sensor=False`: all but the sensor), so it is a fair rival. `CNNRunner` gives it the
`infer(obs)` / `reset()` surface of `PolicyRunner`, so the same `rollout` scores both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class CNNBaselineConfig:
    """Sizes and optimisation of the reference CNN."""

    channels: int = 32
    keypoints: int = 16  # spatial-softmax keypoints per camera
    hidden: int = 256
    sensor_hidden: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    shift_px: int = 4
    budget_s: float = 120.0  # wall-clock seconds, loading the data included (0 = no wall-clock limit)
    cpu_budget_s: float = 0.0  # CPU-seconds of this process (runtime.cpu_seconds; 0 = no CPU limit)
    max_steps: int = 0  # a step cap (0 = none): smoke tests only
    use_sensor: bool = True  # False: the sensor window is not an input (the "without force" reference)
    seed: int = 0


class SpatialSoftmax(nn.Module):
    """(B, C, h, w) feature maps -> (B, 2C) expected (x, y) of each channel's softmax (keypoints)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 2C) softmax-weighted mean (x, y) per channel, in [-1, 1]."""
        b, c, h, w = x.shape
        attn = torch.softmax(x.flatten(2), dim=-1).view(b, c, h, w)
        ys = torch.linspace(-1, 1, h, device=x.device)
        xs = torch.linspace(-1, 1, w, device=x.device)
        return torch.cat([(attn.sum(2) * xs).sum(-1), (attn.sum(3) * ys).sum(-1)], dim=-1)


class CameraEncoder(nn.Module):
    """One camera: uint8-derived (B, 3, h, w) in [0, 1] -> (B, 2K) keypoints."""

    def __init__(self, channels: int, keypoints: int):
        super().__init__()
        c = channels
        layers: list[nn.Module] = []
        for i, (c_in, c_out, stride) in enumerate([(3, c, 2), (c, c, 1), (c, c, 1), (c, keypoints, 1)]):
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1))
            if i < 3:
                layers += [nn.GroupNorm(8, c_out), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.keypoints = SpatialSoftmax()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> keypoints (B, 2K)."""
        return self.keypoints(self.conv(x))


class CNNPolicy(nn.Module):
    """V cameras + state + sensor window -> an action chunk (B, H, D_a) in normalized units."""

    def __init__(self, cfg: CNNBaselineConfig, views: int, state_dim: int, sensor_shape: tuple[int, int], horizon: int,
                 action_dim: int):  # fmt: skip
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.cameras = nn.ModuleList(CameraEncoder(cfg.channels, cfg.keypoints) for _ in range(views))
        t, c = sensor_shape
        self.sensor = nn.Sequential(nn.Linear(t * c + t, cfg.sensor_hidden), nn.ReLU()) if c else None
        width = views * 2 * cfg.keypoints + state_dim + (cfg.sensor_hidden if c else 0)
        self.mlp = nn.Sequential(
            nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, horizon * action_dim),
        )  # fmt: skip

    def forward(self, images: torch.Tensor, state: torch.Tensor, sensor: torch.Tensor, sensor_mask: torch.Tensor):
        """images (B, V, 3, h, w) float in [0, 1], state (B, D_st), sensor (B, T_s, C_s), mask (B, T_s)."""
        parts = [cam(images[:, v]) for v, cam in enumerate(self.cameras)] + [state]
        if self.sensor is not None:
            s = (sensor * sensor_mask[..., None]).flatten(1)
            parts.append(self.sensor(torch.cat([s, sensor_mask.float()], dim=1)))
        return self.mlp(torch.cat(parts, dim=1)).view(-1, self.horizon, self.action_dim)


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """(B, V, 3, h, w) -> the same, each image shifted by up to `pad` px (replicate pad + random crop)."""
    if pad <= 0:
        return images
    b, v, c, h, w = images.shape
    flat = F.pad(images.reshape(b * v, c, h, w), (pad,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b * v,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b * v,), generator=generator)
    out = torch.stack([flat[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b * v)])
    return out.view(b, v, c, h, w)


def _tensors(raws: list[dict], normalizer) -> dict[str, torch.Tensor]:
    """Raw samples -> stacked tensors (images uint8 (N, V, 3, h, w), normalized state/sensor/actions)."""
    images = torch.from_numpy(np.stack([np.stack(r["images"]) for r in raws])).permute(0, 1, 4, 2, 3).contiguous()
    state = np.stack([r["state"] for r in raws]).astype(np.float32)
    out = {"images": images, "state": torch.from_numpy(np.asarray(normalizer.normalize("state", state), np.float32))}
    mask = np.stack([r["sensor_mask"] & bool(r["has_sensor"]) for r in raws])
    sensor = np.stack([r["sensor"] for r in raws]).astype(np.float32)
    if sensor.shape[-1] and mask.any():
        sensor = np.asarray(normalizer.normalize("sensor", sensor), np.float32)
    out["sensor"] = torch.from_numpy(np.where(mask[..., None], sensor, 0.0).astype(np.float32))
    out["sensor_mask"] = torch.from_numpy(mask)
    if raws[0].get("actions") is not None:
        acts = np.stack([r["actions"] for r in raws]).astype(np.float32)
        out["actions"] = torch.from_numpy(np.asarray(normalizer.normalize("actions", acts), np.float32))
        out["action_mask"] = torch.from_numpy(np.stack([r["action_mask"] for r in raws]))
    return out


def train_cnn_baseline(
    dataset_dir: str | Path,
    data_cfg,
    normalizer,
    cfg: CNNBaselineConfig | None = None,
    progress: bool = True,
    stop=None,
) -> tuple[CNNPolicy, dict]:
    """Train the reference CNN on the train split until its budget is spent (`cfg.budget_s` seconds of wall
    clock, `cfg.cpu_budget_s` CPU-seconds, `cfg.max_steps` steps: whichever comes first; loading the data
    counts) or `stop()` returns True.

    Returns (policy, summary with steps, samples seen, final training loss, the wall time and CPU-seconds
    spent, and the constructor arguments `shape` of the policy)."""
    from sensorvla.data.dataset import EpisodeDataset
    from sensorvla.progress import Progress
    from sensorvla.runtime import cpu_seconds

    cfg = cfg or CNNBaselineConfig()
    if cfg.budget_s <= 0 and cfg.cpu_budget_s <= 0 and cfg.max_steps <= 0:
        raise ValueError("CNNBaselineConfig: set budget_s, cpu_budget_s or max_steps (all are 0: no end)")
    start, cpu_start = time.perf_counter(), cpu_seconds()
    ds = EpisodeDataset(dataset_dir, data_cfg, split="train")
    data = _tensors([ds[i] for i in range(len(ds))], normalizer)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, v = data["images"].shape[:2]
    if not cfg.use_sensor:  # a (T_s, 0) window: the policy has no sensor branch
        data["sensor"] = data["sensor"][..., :0]
    shape = {
        "views": v,
        "state_dim": ds.meta.state_dim,
        "sensor_shape": list(data["sensor"].shape[1:]),
        "horizon": data_cfg.horizon,
        "action_dim": data["actions"].shape[-1],
    }
    policy = CNNPolicy(cfg, **{**shape, "sensor_shape": tuple(shape["sensor_shape"])})
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps, loss_val = 0, float("nan")
    stop = stop or (lambda: False)

    def spent() -> bool:
        return (
            (cfg.budget_s > 0 and time.perf_counter() - start >= cfg.budget_s)
            or (cfg.cpu_budget_s > 0 and cpu_seconds() - cpu_start >= cfg.cpu_budget_s)
            or (cfg.max_steps > 0 and steps >= cfg.max_steps)
        )

    bar = Progress(total=int(cfg.budget_s), desc="cnn baseline", mode=progress, unit="s")
    while not spent() and not stop():
        elapsed = time.perf_counter() - start
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        images = random_shift(data["images"][idx].float() / 255.0, cfg.shift_px, gen)
        pred = policy(images, data["state"][idx], data["sensor"][idx], data["sensor_mask"][idx])
        m = data["action_mask"][idx].float()[..., None]
        loss = ((pred - data["actions"][idx]).abs() * m).sum() / (m.sum() * pred.shape[-1]).clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps, loss_val = steps + 1, float(loss.detach())
        bar.update(int(min(elapsed, cfg.budget_s)) - bar.n)
        bar.set_postfix(loss=f"{loss_val:.4f}", steps=steps)
    bar.close()
    policy.eval()
    return policy, {"steps": steps, "samples_seen": steps * cfg.batch_size, "final_loss": loss_val,
                    "wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu_start, "train_samples": n,
                    "shape": shape}  # fmt: skip


def dataset_normalizer(dataset_dir: Path, data_cfg):
    """The `Normalizer` of the dataset's norm stats (`sensorvla stats`) under `data_cfg`: what the CNN trains and
    runs with."""
    from sensorvla.data.normalize import Normalizer, NormStats
    from sensorvla.training.data_setup import stats_path

    stats = NormStats.load(stats_path(dataset_dir))
    return Normalizer(stats, mode=data_cfg.normalization, streams=data_cfg.streams)


def train_in_background(dataset_dir: Path, data_cfg, out_dir: Path, *, threads: int, budget_s: float, seed: int = 0):
    """Start training the reference in a separate process (spawned, `threads` intra-op threads). Returns
    (process, stop event): set the event to end training; the process then writes `out_dir`
    (model.safetensors + info.json) and exits."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    args = (str(dataset_dir), dataclasses.asdict(data_cfg), str(out_dir), threads, budget_s, seed, stop)
    proc = ctx.Process(target=_background_worker, args=args, name="cnn-reference", daemon=True)
    proc.start()
    return proc, stop


def _background_worker(dataset_dir, data_cfg, out_dir, threads, budget_s, seed, stop) -> None:
    """The spawned process of `train_in_background`."""
    torch.set_num_threads(threads)
    from sensorvla.config import DataConfig, section_from_dict
    from sensorvla.io import atomic_write_json, save_safetensors

    dc = section_from_dict(DataConfig, data_cfg, "data.")
    cfg = CNNBaselineConfig(budget_s=budget_s, seed=seed)
    policy, info = train_cnn_baseline(
        dataset_dir, dc, dataset_normalizer(dataset_dir, dc), cfg, progress=False, stop=stop.is_set
    )
    save_safetensors(policy.state_dict(), Path(out_dir) / "model.safetensors")
    atomic_write_json(Path(out_dir) / "info.json", {**info, "threads": threads, "config": dataclasses.asdict(cfg)})


def load_trained(out_dir: Path) -> tuple[CNNPolicy, dict]:
    """The policy and summary written by `train_in_background`."""
    import json

    from safetensors.torch import load_file

    info = json.loads((Path(out_dir) / "info.json").read_text())
    shape = {**info["shape"], "sensor_shape": tuple(info["shape"]["sensor_shape"])}
    policy = CNNPolicy(CNNBaselineConfig(**info["config"]), **shape)
    policy.load_state_dict(load_file(str(Path(out_dir) / "model.safetensors")))
    return policy.eval(), info


class CNNRunner:
    """`infer(obs)` / `reset()` over a trained `CNNPolicy`, with the VLA runner's sensor windowing.

    Args:
        policy: the trained CNN; normalizer: the dataset's `Normalizer`; data_cfg: the `DataConfig`
            the policy was trained with (views, sensor window).
    """

    def __init__(self, policy: CNNPolicy, normalizer, data_cfg):
        from sensorvla.data.dataset import default_max_gap_s

        self.policy, self.normalizer, self.data_cfg = policy.eval(), normalizer, data_cfg
        self.max_gap_s = default_max_gap_s(data_cfg)

    def reset(self) -> None:
        """Stateless: nothing to forget between episodes."""

    @torch.inference_mode()
    def infer(self, obs: dict) -> dict:
        """Observation dict (as for PolicyRunner) -> {"actions": (H, D_a) physical units, "timing"}."""
        from sensorvla.data.timeline import resample_window

        t0 = time.perf_counter()
        d = self.data_cfg
        sensor = np.asarray(obs.get("sensor", np.zeros((0, 1))), np.float32)
        ts = np.asarray(obs.get("sensor_timestamps", np.zeros(len(sensor))), np.float64)
        t = float(obs["timestamp"]) if "timestamp" in obs else (float(ts[-1]) if len(ts) else 0.0)
        channels = self.policy.sensor[0].in_features // d.sensor_samples - 1 if self.policy.sensor else 1
        if len(sensor):
            window, mask = resample_window(ts, sensor, t, d.sensor_window_s, d.sensor_samples, self.max_gap_s)
        else:
            window, mask = np.zeros((d.sensor_samples, channels), np.float32), np.zeros(d.sensor_samples, bool)
        raw = {"images": list(obs["images"]), "state": np.asarray(obs["state"], np.float32), "sensor": window,
               "sensor_mask": mask, "has_sensor": bool(mask.any())}  # fmt: skip
        x = _tensors([raw], self.normalizer)
        pred = self.policy(x["images"].float() / 255.0, x["state"], x["sensor"], x["sensor_mask"])[0].numpy()
        actions = np.asarray(self.normalizer.unnormalize("actions", pred), np.float32)
        return {"actions": actions, "timing": {"total_ms": (time.perf_counter() - t0) * 1e3}}
