"""`SensorVLAPolicy`: a sensorvla checkpoint behind LeRobot's `PreTrainedPolicy` interface.

`from_pretrained` loads an exported folder (`sensorvla export`, or a hub id `org/name[@revision]` resolved in the
local hub cache) with sensorvla's own loader and its checks (config, manifest, strict weights, norm stats), into a
`sensorvla.inference.runner.PolicyRunner`: the same transform chain and runner as `sensorvla serve`.
`predict_action_chunk` / `select_action` turn LeRobot's observation batch into the runner's observation, one per batch
row, and return the runner's actions (physical units, LeRobot's `action` convention).

LeRobot batch -> runner observation, row b:
    observation.images.<view> | <view key>   float (B, 3, h, w) in [0, 1] -> uint8 (h, w, 3) (x * 255, rounded:
                                              exactly the camera's bytes, LeRobot divided them by 255)
    observation.state                        (B, D_st) -> state
    task                                     list[str] | str -> instruction
    observation.timestamp (optional)         (B,) seconds -> timestamp; without it the session's frame counter / fps
    <sensor key>, e.g. observation.force     (B, C) one sample at the observation's time, or (B, N, C) a window of
                                             N samples with <sensor key>_timestamps (B, N) on the same clock
Each batch row has its own runner session (sensor history, fast-slow VL features), reset by `reset()`; samples a row
has seen already are ignored by the history, so a robot may send overlapping windows at its own rate.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.policies.pretrained import PreTrainedPolicy
from torch import Tensor

from lerobot_policy_sensorvla.configuration_sensorvla import POLICY_TYPE, SensorVLAConfig

TIMESTAMP_KEY = "observation.timestamp"


class TrainingStaysInSensorVLAError(NotImplementedError):
    """LeRobot asked to build or train a fresh sensorvla policy: training is `sensorvla train`."""


def observation_key(key: str) -> str:
    """A sensor key's LeRobot observation key: `observation.force` as it is, a sidecar stream `sensor` ->
    `observation.sensor`."""
    return key if key.startswith("observation.") else f"observation.{key}"


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def to_uint8_image(chw: Any) -> np.ndarray:
    """LeRobot's float (3, h, w) image in [0, 1] -> the camera's uint8 (h, w, 3) bytes."""
    x = _numpy(chw).astype(np.float64)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)


class SensorVLAPolicy(PreTrainedPolicy):
    """A trained sensorvla policy as a LeRobot policy (type `sensorvla`); see the module docstring.

    Args:
        config: its `SensorVLAConfig` (LeRobot side).
        runner: the loaded `PolicyRunner`; only `from_pretrained` builds one (training stays in sensorvla).
    """

    config_class = SensorVLAConfig
    name = POLICY_TYPE

    def __init__(self, config: SensorVLAConfig, runner=None, **kwargs: Any):
        super().__init__(config)
        if runner is None:
            raise TrainingStaysInSensorVLAError(
                "a sensorvla policy is trained with `sensorvla train --dataset_dir <LeRobot dataset or hub id>`, "
                "exported with `sensorvla export`, and loaded here with --policy.path=<exported folder> "
                "(docs/lerobot.md); LeRobot cannot build or train one from --policy.type=sensorvla"
            )
        self.runner = runner
        self.model = runner.policy  # registered, so .to() / .eval() / parameters() reach the weights
        views = list(runner.cfg.data.views)
        from sensorvla.models.folder import lerobot_image_key

        self.image_keys = [lerobot_image_key(v) for v in views]
        self.sensor_keys = [observation_key(k) for k in config.sensor_keys] if runner.cfg.model.sensor.enabled else []
        self._sessions: list = []
        self._steps: list[int] = []
        self._queue: deque[Tensor] = deque()

    # --- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | Path,
        *,
        config: SensorVLAConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> SensorVLAPolicy:
        """Load an exported folder (or a hub id in the local hub cache) through sensorvla's loader and checks.

        Raises:
            sensorvla's named errors: `CheckpointMismatchError` (a changed or corrupt file, a bad config),
            `HubCacheMissError` (a hub id not in the cache offline), `BackboneLoadError`.
        """
        from lerobot.configs.policies import PreTrainedConfig

        from sensorvla import hub
        from sensorvla.inference.runner import PolicyRunner

        path = hub.resolve(pretrained_name_or_path, repo_type="model", revision=revision).path
        if config is None:
            config = PreTrainedConfig.from_pretrained(path)
        if not isinstance(config, SensorVLAConfig):
            raise TypeError(f"{path} is a {config.type!r} policy, not a sensorvla one")
        device = config.device or "cpu"
        runner = PolicyRunner.from_pretrained(path, device=device, vl_model=config.vl_model_override)
        policy = cls(config, runner=runner)
        policy.to(device)
        policy.eval()
        return policy

    def _apply(self, fn, *args, **kwargs):
        """`.to(device)` moves the weights; the runner follows them (its batches and autocast)."""
        out = super()._apply(fn, *args, **kwargs)
        first = next(self.model.parameters(), None)
        if first is not None:
            self.runner.device = first.device
        return out

    # --- LeRobot's interface ------------------------------------------------------------------------------
    def get_optim_params(self) -> dict:
        """Training stays in sensorvla."""
        raise TrainingStaysInSensorVLAError("train with `sensorvla train` (docs/lerobot.md)")

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict | None]:
        """Training stays in sensorvla."""
        raise TrainingStaysInSensorVLAError("train with `sensorvla train` (docs/lerobot.md)")

    def reset(self) -> None:
        """Episode start: every row's sensor history and VL features are cleared, the action queue emptied."""
        for session in self._sessions:
            session.reset()
        self._steps = [0] * len(self._sessions)
        self._queue.clear()

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], **kwargs: Any) -> Tensor:
        """LeRobot batch -> actions (B, H, D_a) float32 in physical units, through sensorvla's runner."""
        rows = self._batch_size(batch)
        while len(self._sessions) < rows:
            self._sessions.append(self.runner.new_session())
            self._steps.append(0)
        chunks = []
        for b in range(rows):
            out = self._sessions[b].infer(self.runner_observation(batch, b))
            self._steps[b] += 1
            chunks.append(torch.from_numpy(np.asarray(out["actions"], np.float32)))
        device = next((v.device for v in batch.values() if torch.is_tensor(v)), torch.device("cpu"))
        return torch.stack(chunks).to(device)

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any], **kwargs: Any) -> Tensor:
        """The next action (B, D_a): the first `n_action_steps` of each predicted chunk in turn."""
        if not self._queue:
            chunk = self.predict_action_chunk(batch)
            steps = self.config.n_action_steps or chunk.shape[1]
            self._queue.extend(chunk[:, :steps].transpose(0, 1))
        return self._queue.popleft()

    # --- LeRobot batch -> runner observation ----------------------------------------------------------------
    def _batch_size(self, batch: dict[str, Any]) -> int:
        key = next((k for k in self.image_keys if k in batch), None)
        if key is None:
            raise KeyError(
                f"the observation has none of the policy's cameras {self.image_keys} (it has {sorted(batch)}); "
                "map the robot's or env's camera keys with --rename_map"
            )
        return int(batch[key].shape[0])

    def runner_observation(self, batch: dict[str, Any], b: int) -> dict[str, Any]:
        """Row `b` of a LeRobot batch as the runner's observation (module docstring)."""
        missing = [k for k in self.image_keys if k not in batch]
        if missing:
            raise KeyError(f"camera(s) {missing} missing from the observation; map them with --rename_map")
        obs: dict[str, Any] = {"images": [to_uint8_image(batch[k][b]) for k in self.image_keys]}
        task = batch.get("task", "")
        obs["instruction"] = str(task[b] if isinstance(task, list | tuple) else task)
        m = self.runner.cfg.model
        if m.state_dim:
            obs["state"] = _numpy(batch["observation.state"][b]).astype(np.float32).reshape(-1)
        t = self._time(batch, b)
        obs["timestamp"] = t
        if m.sensor.enabled:
            obs["sensor"], obs["sensor_timestamps"] = self._sensor(batch, b, t)
        return obs

    def _time(self, batch: dict[str, Any], b: int) -> float:
        if TIMESTAMP_KEY in batch:
            return float(_numpy(batch[TIMESTAMP_KEY]).reshape(-1)[b])
        return self._steps[b] / float(self.config.fps or 1.0)

    def _sensor(self, batch: dict[str, Any], b: int, t: float) -> tuple[np.ndarray, np.ndarray]:
        """The sensor rows of row `b`: (N, C_s) float32 and their timestamps (N,); (0, C_s) when the observation
        carries none (the runner then uses its history, or the policy's missing-sensor token)."""
        channels = self.runner.cfg.model.sensor.channels
        present = [k for k in self.sensor_keys if k in batch]
        if not present:
            return np.zeros((0, channels), np.float32), np.zeros(0)
        if len(present) != len(self.sensor_keys):
            raise KeyError(f"sensor features {sorted(set(self.sensor_keys) - set(present))} missing beside {present}")
        values = [_numpy(batch[k][b]).astype(np.float32) for k in present]
        if all(v.ndim == 1 for v in values):  # one sample per key at the observation's time
            return np.concatenate(values)[None, :], np.array([t])
        if len(present) != 1 or values[0].ndim != 2:
            raise ValueError(f"a sensor window (N, C) comes from one feature; got {[v.shape for v in values]}")
        stamps_key = f"{present[0]}_timestamps"
        if stamps_key not in batch:
            raise KeyError(f"a sensor window {present[0]} needs its timestamps {stamps_key} (N,), same clock as t")
        return values[0], _numpy(batch[stamps_key][b]).astype(np.float64).reshape(-1)
