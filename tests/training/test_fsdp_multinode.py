"""FSDP2 and multi-node under torchrun (gloo on CPU): FSDP2 resume equals the uninterrupted run, LoRA under
FSDP2 trains only the adapters, 2 nodes x 1 process equal 1 node x 2 processes, and the global batch flag."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_distributed import run_then_resume, torchrun_script
from test_seed_commands import env_for
from test_train import assert_same_tensors, losses, tensors_of, tiny_cfg

from sensorvla.training.loop import train

# a hang guard only, never a performance limit: a loaded machine may take many times the usual time
HANG_GUARD_S = 3600


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory, tiny_vl_dir, synth_dataset_dir) -> Path:
    """A stage-1 seed checkpoint (one in-process step) for the stage-2 runs below."""
    out = tmp_path_factory.mktemp("stage1")
    train(tiny_cfg(tiny_vl_dir, synth_dataset_dir, out, max_steps=1), progress=False)
    return out / "checkpoints" / "qwen_vla_sensor_best.pt"


def fsdp_cfg(tiny_vl_dir, synth_dataset_dir, out, stage1_file, mode: str, **train_kw):
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, out, **train_kw)
    cfg.train.stage, cfg.train.stage1_checkpoint, cfg.train.strategy = "stage2", str(stage1_file), "fsdp"
    cfg.train.batch_size = 4
    cfg.model.finetune.mode = mode
    return cfg


@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.slow)])  # full: +50 s
def test_fsdp2_resume_equals_uninterrupted(tmp_path, tiny_vl_dir, synth_dataset_dir, stage1_file, mode):
    """Stage 2 under FSDP2 on 2 ranks: 4 steps, vs. resuming from the `last` saved at step 2 (full states
    gathered at save, resharded at load): the same losses and identical final tensors (weights + AdamW)."""
    full = fsdp_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "full", stage1_file, mode, max_steps=4)
    full.train.save_every_steps = 2
    log = run_then_resume(tmp_path, full, env_for(tiny_vl_dir))
    assert "resumed at epoch 0, step 2" in log
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert set(a) == {1, 2, 3, 4} and set(b) == {3, 4}
    assert b == {s: a[s] for s in (3, 4)}
    last = "checkpoints/last/checkpoint.pt"
    saved = tensors_of(tmp_path / "full" / last)
    assert any("exp_avg" in k for k in saved)  # the optimizer state is compared too
    if mode == "full":
        assert any(k.startswith("/model_state_dict/backbone.model.") for k in saved)
    assert_same_tensors(saved, tensors_of(tmp_path / "resumed" / last))


LORA_ONLY = """
    import json, sys
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from sensorvla.config import SensorVLAConfig
    from sensorvla.training import loop

    close = loop._close

    def spy(run):  # the trained (sharded) model, gathered, before teardown
        full = get_model_state_dict(run.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if run.info.is_main:
            torch.save(dict(full), sys.argv[2])
            info = {
                "trainable": sorted(n for n, p in run.policy.named_parameters() if p.requires_grad),
                "sharded": sum(type(p).__name__ == "DTensor" for p in run.policy.parameters()),
                "params": sum(1 for _ in run.policy.parameters()),
                "groups": [g["name"] for g in run.optimizer.param_groups],
            }
            open(sys.argv[3], "w").write(json.dumps(info))
        close(run)

    loop._close = spy
    loop.train(SensorVLAConfig.load(sys.argv[1]), progress=False)
"""


def test_lora_under_fsdp2_trains_only_the_adapters(tmp_path, tiny_vl_dir, synth_dataset_dir, stage1_file):
    """Stage 2 LoRA sharded by FSDP2 over 2 ranks: every parameter is a DTensor; the trainable set and the
    optimizer groups are the adapters + the policy's own modules; after 3 steps every adapter B matrix
    (initialised to zero) moved, and every frozen base weight is bit-equal to the loaded backbone's."""
    from sensorvla.config import resolve_from_meta
    from sensorvla.data.format import load_meta
    from sensorvla.models.finetune import HF_BASE_PREFIX, is_lora_param
    from sensorvla.models.policy import build_policy

    cfg = fsdp_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "run", stage1_file, "lora", max_steps=3)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    out_sd, out_info = tmp_path / "trained.pt", tmp_path / "info.json"
    torchrun_script(tmp_path, LORA_ONLY, [str(tmp_path / "cfg.json"), str(out_sd), str(out_info)], env_for(tiny_vl_dir))
    info = json.loads(out_info.read_text())
    trained = torch.load(out_sd, weights_only=True)
    start = build_policy(resolve_from_meta(copy.deepcopy(cfg).validate(), load_meta(synth_dataset_dir)))
    initial = start.state_dict()
    assert info["sharded"] == info["params"] > 0  # FSDP2 really sharded the model
    lora = [k for k in initial if is_lora_param(k)]
    base = [k for k in initial if k.startswith(HF_BASE_PREFIX) and not is_lora_param(k)]
    assert lora and base
    assert set(info["trainable"]) == {n for n, _ in start.named_parameters() if is_lora_param(n)} | {
        n for n, _ in start.named_parameters() if not n.startswith(HF_BASE_PREFIX)
    }
    assert {g.split("/")[0] for g in info["groups"]} <= {"head", "fusion", "sensor_encoder", "vl_projection", "vl_lora"}
    assert "vl_lora" in {g.split("/")[0] for g in info["groups"]}
    moved_b = [k for k in lora if "lora_B" in k and not torch.equal(trained[k], initial[k])]
    assert moved_b == [k for k in lora if "lora_B" in k]
    changed_base = [k for k in base if not torch.equal(trained[k], initial[k])]
    assert not changed_base, changed_base[:5]


TRAIN = """
    import sys
    from sensorvla.config import SensorVLAConfig
    from sensorvla.training.loop import train

    train(SensorVLAConfig.load(sys.argv[1]), progress=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_node_two_processes(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """`torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 1` with a c10d rendezvous on 127.0.0.1 (gloo)
    gives the same per-step losses, bit for bit, as `--standalone --nproc-per-node 2`."""
    env = env_for(tiny_vl_dir)
    one = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "one_node", max_steps=3)
    (tmp_path / "one.json").write_text(one.to_json())
    log = torchrun_script(tmp_path, TRAIN, [str(tmp_path / "one.json")], env)
    assert "global batch 32 = batch 8 x accumulation 2 x world size 2" in log
    two = copy.deepcopy(one)
    two.train.output_dir = str(tmp_path / "two_nodes")
    (tmp_path / "two.json").write_text(two.to_json())
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(TRAIN))
    port = free_port()
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node)]
        cmd += ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
        cmd += ["--rdzv-id", "sensorvla-test", "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1"]
        log_file = (tmp_path / f"node{node}.log").open("w")
        nodes.append(
            subprocess.Popen(
                [*cmd, str(script), str(tmp_path / "two.json")],
                cwd=tmp_path,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        )
    codes = [p.wait(timeout=HANG_GUARD_S) for p in nodes]
    logs = "".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], logs
    assert "world size 2" in logs
    a, b = losses(tmp_path / "one_node"), losses(tmp_path / "two_nodes")
    assert set(a) == {1, 2, 3}
    assert a == b


def test_global_batch_size_derives_accumulation(tmp_path, tiny_vl_dir, synth_dataset_dir, capfd):
    """`--train.global-batch-size 32` at batch 8 on 1 process -> accumulation 4 (logged, saved); a global batch
    that does not divide is refused naming the flag."""
    from sensorvla.config import ConfigError, derive_grad_accum

    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path, max_steps=1)
    cfg.train.global_batch_size = 32
    out = train(cfg, progress=False)
    assert out["config"]["train"]["grad_accum_steps"] == 4
    assert "global batch 32 = batch 8 x accumulation 4 x world size 1" in capfd.readouterr().err
    assert derive_grad_accum(cfg.train, 2) == 2 and derive_grad_accum(cfg.train, 4) == 1
    with pytest.raises(ConfigError, match="--train.global-batch-size 32 is not divisible"):
        derive_grad_accum(cfg.train, 3)
    cfg.train.global_batch_size = 12
    with pytest.raises(ConfigError, match="--train.global-batch-size"):
        cfg.validate()
