"""A sensorvla policy is a LeRobot policy (plugins/lerobot_policy_sensorvla), checked with the real lerobot 0.4.4 in
its own environment (marker `interop`; skipped unless SENSORVLA_LEROBOT_PYTHON names that environment's python, which
`.ci/run` builds): LeRobot writes a PushT-shaped dataset, sensorvla trains on it and exports, and then in LeRobot

- the plugin registers (`register_third_party_plugins`), `--policy.path` loads the export, and a tampered copy is
  refused with sensorvla's `CheckpointMismatchError`;
- `predict_action_chunk` / `select_action` equal sensorvla's runner on the same observations, exactly (the same
  runner on the same device: tolerance 0), with the per-frame sensor `observation.force` over six steps;
- `lerobot-eval` runs it on the PushT sim for 2 episodes (camera mapped with --rename_map);
- LeRobot's async inference server (the plugin's launcher) serves it to LeRobot's client protocol on localhost.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

SIDE = Path(__file__).with_name("lerobot_side.py")


def lerobot_python() -> str | None:
    """SENSORVLA_LEROBOT_PYTHON (the env .ci/run builds, with sensorvla and the plugin installed), else None."""
    return os.environ.get("SENSORVLA_LEROBOT_PYTHON") or None


NO_ENV = "no LeRobot environment: set SENSORVLA_LEROBOT_PYTHON (.ci/run builds one under .ci-envs/)"


def lerobot_env(home: Path) -> dict:
    """Offline, LeRobot's home in the test's folder, pygame without a display (PushT)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(home), "SDL_VIDEODRIVER": "dummy"}


def lerobot(exe: str, *args: str, home: Path, timeout: int = 600) -> dict:
    env = lerobot_env(home)  # cwd: the async server writes logs/ there
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=home.parent)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_vl_dir):
    """(lerobot python, exported folder, work dir): a LeRobot-written dataset, a sensorvla run on it, the export."""
    exe = lerobot_python()
    import torch

    from sensorvla.cli.app import main
    from sensorvla.config import DataConfig, SensorVLAConfig
    from sensorvla.training.loop import train

    work = tmp_path_factory.mktemp("lerobot_policy")
    home = work / "lerobot_home"
    made = lerobot(exe, str(SIDE), "make-dataset", str(work / "ds"), home=home)
    cfg = SensorVLAConfig()
    cfg.model.backbone.vl_model = str(tiny_vl_dir)
    cfg.data = DataConfig(
        dataset_dir=made["root"], val_fraction=0.0, test_fraction=0.0, horizon=4, sensor_window_s=1.0, sensor_samples=8
    )
    cfg.train.output_dir = str(work / "run")
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.epochs, cfg.train.max_steps = 8, 1, 5, 6
    cfg.train.log_every_steps, cfg.train.tensorboard, cfg.train.use_cache = 1, False, "never"
    cfg.train.val_every_epochs = 1000
    torch.manual_seed(0)
    train(cfg, progress=False)
    out = work / "export"
    assert (
        main(["export", "--checkpoint", str(work / "run" / "checkpoints" / "pretrained_model"), "--out", str(out)]) == 0
    )
    return exe, out, work


@pytest.mark.interop
@pytest.mark.skipif(lerobot_python() is None, reason=NO_ENV)
def test_lerobot_loads_it_and_its_actions_equal_the_runner(exported):
    exe, out, work = exported
    got = lerobot(exe, str(SIDE), "check", str(out), str(work), home=work / "lerobot_home")
    assert got["policy_class"] == "SensorVLAPolicy" and got["config_type"] == "sensorvla"
    assert got["shape"] == [2, 4, 2] and got["chunks_differ"]
    assert got["max_abs_diff"] == 0.0  # one runner, one device, fp32: exactly equal
    assert got["select_action_equal"]
    assert got["window_max_abs_diff"] == 0.0  # a sensor window (N, C) with its timestamps, overlapping per step
    for name, error in got["tampered"].items():
        assert error.startswith("CheckpointMismatchError") and name in error, (name, error)


@pytest.mark.interop
@pytest.mark.skipif(lerobot_python() is None, reason=NO_ENV)
def test_lerobot_eval_runs_it_on_pusht(exported):
    exe, out, work = exported
    eval_bin = str(Path(exe).with_name("lerobot-eval"))
    args = [
        f"--policy.path={out}",
        "--env.type=pusht",
        "--env.episode_length=12",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        "--policy.device=cpu",
        f"--output_dir={work / 'eval'}",
        '--rename_map={"observation.image": "observation.images.top"}',
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_LEROBOT_HOME": str(work / "lerobot_home"),
        "SDL_VIDEODRIVER": "dummy",
    }
    proc = subprocess.run([eval_bin, *args], capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    info = json.loads((work / "eval" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 2
    sums = info["per_task"][0]["metrics"]["sum_rewards"]
    assert len(sums) == 2 and all(x >= 0 for x in sums)


@pytest.mark.interop
@pytest.mark.skipif(lerobot_python() is None, reason=NO_ENV)
def test_lerobot_async_inference_serves_it(exported):
    exe, out, work = exported
    port = str(20000 + os.getpid() % 20000)
    got = lerobot(exe, str(SIDE), "async", str(out), port, home=work / "lerobot_home")
    assert got["timesteps"] == [0, 1, 2, 3] and len(got["actions"]) == 4
    assert got["max_abs_diff"] == 0.0
