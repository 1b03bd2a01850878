"""Run by the real-lerobot environment's python (tests/plugins/test_lerobot_policy.py), one command per call:

    make-dataset OUT            a PushT-shaped LeRobot dataset written by LeRobot itself: observation.images.top (96x96
                                RGB), observation.state (2,), action (2,) and a per-frame sensor observation.force (3,)
    check EXPORT WORK           the plugin registers; LeRobot loads the exported folder; its actions equal sensorvla's
                                runner's for the same observations; a tampered copy is refused
    async EXPORT PORT           LeRobot's async inference server (the plugin's launcher) serves it to LeRobot's client

Each prints one line `RESULT <json>`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

FPS, H, W = 10, 96, 96
CAMERA = "observation.images.top"  # PushT's env camera `observation.image` maps to it with --rename_map
TASKS = ["Push the T-shaped block onto the T-shaped target.", "push the block"]
LENGTHS = [14, 12]


def frame(e: int, i: int) -> np.ndarray:
    """A deterministic camera frame (uint8 (H, W, 3)) of episode e, frame i."""
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([(x * 2 + 9 * i) % 256, (y * 3 + 40 * e) % 256, ((x + y) * (i + 1)) % 256], -1)
    return img.astype(np.uint8)


def state(e: int, i: int) -> np.ndarray:
    return np.array([100.0 + 5 * i + e, 200.0 - 3 * i], np.float32)


def action(e: int, i: int) -> np.ndarray:
    return np.array([110.0 + 5 * i, 190.0 - 2 * i + e], np.float32)


def force(e: int, i: int) -> np.ndarray:
    return np.array([np.sin(i / 3 + e), np.cos(i / 4), 0.1 * i], np.float32)


def make_dataset(out: str) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    feats = {
        CAMERA: {"dtype": "image", "shape": (H, W, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
        "observation.force": {"dtype": "float32", "shape": (3,), "names": None},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
    }
    ds = LeRobotDataset.create(repo_id="sensorvla/pusht_tiny", fps=FPS, features=feats, root=out, use_videos=False)
    for e, (n, task) in enumerate(zip(LENGTHS, TASKS)):
        for i in range(n):
            ds.add_frame(
                {
                    "task": task,
                    CAMERA: frame(e, i),
                    "observation.state": state(e, i),
                    "observation.force": force(e, i),
                    "action": action(e, i),
                }
            )
        ds.save_episode()
    ds.finalize()
    return {"root": out, "frames": sum(LENGTHS)}


def lerobot_batch(rows: list[tuple[int, int]]):
    """LeRobot's observation batch (as lerobot-eval / lerobot-record hand it to the policy) of (episode, frame) rows."""
    import torch

    img = np.stack([frame(e, i) for e, i in rows]).astype(np.float32) / 255.0
    return {
        CAMERA: torch.from_numpy(img).permute(0, 3, 1, 2).contiguous(),
        "observation.state": torch.from_numpy(np.stack([state(e, i) for e, i in rows])),
        "observation.force": torch.from_numpy(np.stack([force(e, i) for e, i in rows])),
        "task": [TASKS[e] for e, _ in rows],
    }


def runner_obs(e: int, i: int) -> dict:
    """The same observation in sensorvla's own format (docs/serving.md), built from the camera bytes directly."""
    t = i / FPS
    return {
        "images": [frame(e, i)],
        "state": state(e, i),
        "sensor": force(e, i)[None, :],
        "sensor_timestamps": np.array([t]),
        "timestamp": t,
        "instruction": TASKS[e],
    }


def check(export: str, work: str) -> dict:
    import torch
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.envs.configs import PushtEnv
    from lerobot.policies.factory import get_policy_class, make_policy, make_pre_post_processors
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()  # what lerobot-eval / lerobot-record do first
    out: dict = {"policy_class": get_policy_class("sensorvla").__name__}
    cfg = PreTrainedConfig.from_pretrained(export)
    cfg.pretrained_path = Path(export)
    out["config_type"] = cfg.type
    policy = make_policy(cfg, env_cfg=PushtEnv(episode_length=8), rename_map={"observation.image": CAMERA})
    pre, post = make_pre_post_processors(cfg, pretrained_path=export)
    from sensorvla.inference.runner import PolicyRunner

    runner = PolicyRunner.from_pretrained(export)
    sessions = [runner.new_session(), runner.new_session()]
    policy.reset()
    diffs, chunks = [], []
    for i in range(6):  # two rows, two episodes, six steps: the per-row sensor history matters
        rows = [(0, i), (1, i)]
        with torch.inference_mode():
            got = post(policy.predict_action_chunk(pre(lerobot_batch(rows))))
        want = np.stack([s.infer(runner_obs(e, j))["actions"] for s, (e, j) in zip(sessions, rows)])
        diffs.append(float(np.abs(got.numpy() - want).max()))
        chunks.append(got.numpy().tolist())
    out.update(max_abs_diff=max(diffs), shape=list(got.shape), chunks_differ=chunks[0] != chunks[-1])
    # select_action walks the chunk: H actions from one prediction
    policy.reset()
    first = [policy.select_action(pre(lerobot_batch([(0, 0)]))).numpy() for _ in range(runner.cfg.model.head.horizon)]
    s = runner.new_session()
    out["select_action_equal"] = bool(np.array_equal(np.concatenate(first), s.infer(runner_obs(0, 0))["actions"]))
    out["window_max_abs_diff"] = sensor_windows(policy, pre, runner)
    out["tampered"] = tampered(export, Path(work))
    return out


def sensor_windows(policy, pre, runner) -> float:
    """A robot sending the last 8 samples of a 50 Hz sensor with their timestamps at every 10 Hz step (windows that
    overlap): the policy's actions against the runner's for the same rows. Returns the largest difference."""
    import torch

    policy.reset()
    session = runner.new_session()
    diffs = []
    for i in range(5):
        ts = np.arange(5 * i - 7, 5 * i + 1) * 0.02  # sample k at k / 50 s: a resent sample has the same stamp
        t = float(ts[-1])
        values = np.sin(ts[:, None] * np.array([3.0, 5.0, 7.0])).astype(np.float32)
        batch = lerobot_batch([(0, i)])
        batch.update(
            {
                "observation.force": torch.from_numpy(values)[None],
                "observation.force_timestamps": torch.from_numpy(ts)[None],
                "observation.timestamp": torch.tensor([t], dtype=torch.float64),
            }
        )
        got = policy.predict_action_chunk(pre(batch)).numpy()[0]
        want = session.infer(dict(runner_obs(0, i), sensor=values, sensor_timestamps=ts, timestamp=t))["actions"]
        diffs.append(float(np.abs(got - want).max()))
    return max(diffs)


def tampered(export: str, work: Path) -> dict:
    """What loading a copy with one changed file raises, per file."""
    from lerobot_policy_sensorvla import SensorVLAPolicy

    out = {}
    for name in ("model.safetensors", "norm_stats.json"):
        copy = work / f"tampered_{name}"
        shutil.copytree(export, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        try:
            SensorVLAPolicy.from_pretrained(copy)
            out[name] = "loaded"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:300]
    return out


def async_inference(export: str, port: str) -> dict:
    """LeRobot's async client protocol against the plugin's launcher of LeRobot's policy server, on localhost."""
    import pickle
    import subprocess
    import time

    import grpc
    import torch
    from lerobot.async_inference.helpers import RemotePolicyConfig, TimedObservation
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import send_bytes_in_chunks

    server = subprocess.Popen(
        [sys.executable, "-m", "lerobot_policy_sensorvla.policy_server", "--host=127.0.0.1", f"--port={port}"]
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = services_pb2_grpc.AsyncInferenceStub(channel)
        stub.Ready(services_pb2.Empty())
        features = {
            "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
            CAMERA: {"dtype": "image", "shape": (H, W, 3), "names": ["height", "width", "channels"]},
        }
        spec = RemotePolicyConfig("sensorvla", export, features, actions_per_chunk=4, device="cpu")
        stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(spec)))
        raw = {"x": float(state(0, 0)[0]), "y": float(state(0, 0)[1]), "top": frame(0, 0), "task": TASKS[0]}
        obs = TimedObservation(timestamp=time.time(), timestep=0, observation=raw, must_go=True)
        stub.SendObservations(send_bytes_in_chunks(pickle.dumps(obs), services_pb2.Observation, log_prefix="[test]"))
        reply = stub.GetActions(services_pb2.Empty())
        actions = pickle.loads(reply.data)
        got = torch.stack([a.get_action() for a in actions]).numpy()
    finally:
        server.terminate()
        server.wait(timeout=60)
    from sensorvla.inference.runner import PolicyRunner

    obs = runner_obs(0, 0)
    obs.pop("sensor"), obs.pop("sensor_timestamps")  # LeRobot's async server passes state and cameras only
    obs.update(sensor=np.zeros((0, 3), np.float32), sensor_timestamps=np.zeros(0), timestamp=0.0)
    want = PolicyRunner.from_pretrained(export).infer(obs)["actions"][:4]
    return {
        "actions": got.tolist(),
        "timesteps": [a.get_timestep() for a in actions],
        "max_abs_diff": float(np.abs(got - want).max()),
    }


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    result = {"make-dataset": make_dataset, "check": check, "async": async_inference}[cmd](*args)
    print("RESULT " + json.dumps(result))
