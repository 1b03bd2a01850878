"""Two gloo ranks on CPU (torchrun): exact validation shards, distinct per-rank training noise after a
validation, and bit-exact resume for the regression and flow heads."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_seed_commands import env_for
from test_train import assert_same_tensors, losses, tensors_of, tiny_cfg

# a hang guard only, never a performance limit: a loaded machine may take many times the usual time
HANG_GUARD_S = 3600


def torchrun_script(tmp_path: Path, code: str, args: list[str], env: dict, nproc: int = 2) -> str:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(code))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    r = subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


SHARDS = """
    import json, sys
    from sensorvla.training.data_setup import ShardedEpochSampler
    from sensorvla.training.distributed import all_gather_objects, all_reduce_sum, init_distributed, teardown

    info = init_distributed("cpu")
    out = {}
    for n in (1, 2, 7, 13):
        sampler = ShardedEpochSampler(n, seed=0, rank=info.rank, world=info.world_size, shuffle=False, pad=False)
        mine = list(sampler)
        count, total = all_reduce_sum([len(mine), sum(mine)], info)
        out[n] = {"count": count, "sum": total, "shards": all_gather_objects(mine, info)}
        train_sampler = ShardedEpochSampler(n, seed=0, rank=info.rank, world=info.world_size)
        out[n]["train_lengths"] = all_gather_objects(len(train_sampler), info)
    if info.is_main:
        open(sys.argv[1], "w").write(json.dumps(out))
    teardown(info)
"""


def test_validation_shards_count_each_sample_once(tmp_path, tiny_vl_dir):
    torchrun_script(tmp_path, SHARDS, [str(tmp_path / "out.json")], env_for(tiny_vl_dir))
    out = json.loads((tmp_path / "out.json").read_text())
    for n, r in out.items():
        n = int(n)
        assert r["count"] == n and r["sum"] == n * (n - 1) / 2, (n, r)  # all-reduced sums: each sample once
        assert sorted(r["shards"][0] + r["shards"][1]) == list(range(n))
        assert len(set(r["train_lengths"])) == 1  # training shards stay equal (DDP lockstep)


NOISE = """
    import hashlib, json, os, sys
    import torch
    from sensorvla.config import SensorVLAConfig
    from sensorvla.models.heads.diffusion import DiffusionHead
    from sensorvla.training.loop import train

    draws = []
    orig = DiffusionHead.loss

    def spy(self, *args, **kwargs):
        # the global RNG state right before a training loss draws its noise and timesteps
        draws.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest() if self.training else "val")
        return orig(self, *args, **kwargs)

    DiffusionHead.loss = spy
    train(SensorVLAConfig.load(sys.argv[1]), progress=False)
    open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w").write(json.dumps(draws))
"""


def test_ranks_draw_different_training_noise_after_validation(tmp_path, tiny_vl_dir, synth_dataset_dir):
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "run", head="diffusion", epochs=2)
    cfg.train.grad_accum_steps = 8  # 2 steps per epoch and rank: validation between epoch 1 and 2
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    torchrun_script(tmp_path, NOISE, [str(tmp_path / "cfg.json"), str(tmp_path)], env_for(tiny_vl_dir))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0) == len(r1) and r0.count("val") > 0
    first_val = r0.index("val")
    after = [i for i in range(first_val, len(r0)) if r0[i] != "val"]
    assert len(after) >= 8  # epoch 2's training draws
    same = [i for i in range(len(r0)) if r0[i] != "val" and r0[i] == r1[i]]
    assert not same, f"ranks drew identical training noise at draws {same}"
    assert len(set(r0[i] for i in after)) == len(after)  # and each rank's stream moves on


RESUME = """
    import shutil, sys
    from pathlib import Path
    from sensorvla.config import SensorVLAConfig
    from sensorvla.training import checkpoint as ckpt
    from sensorvla.training.loop import train

    cfg = SensorVLAConfig.load(sys.argv[1])
    if len(sys.argv) > 2:  # keep a copy of `last` as saved at step 2: what a killed run leaves behind
        save_last = ckpt.save_last

        def keep_step_2(ckpt_dir, payload, state, *args, **kwargs):
            out = save_last(ckpt_dir, payload, state, *args, **kwargs)
            if state["step"] == 2:
                shutil.copytree(out, Path(sys.argv[2]) / "checkpoints" / "last")
            return out

        ckpt.save_last = keep_step_2
    train(cfg, progress=False)
"""


def run_then_resume(tmp_path: Path, full, env: dict) -> str:
    """Run `full` on 2 ranks (RESUME keeps its step-2 `last` in tmp_path/resumed), then resume it there to
    the end; returns the resumed run's log."""
    (tmp_path / "full.json").write_text(full.to_json())
    torchrun_script(tmp_path, RESUME, [str(tmp_path / "full.json"), str(tmp_path / "resumed")], env)
    resumed = copy.deepcopy(full)
    resumed.train.output_dir, resumed.train.resume = str(tmp_path / "resumed"), True
    (tmp_path / "resumed.json").write_text(resumed.to_json())
    return torchrun_script(tmp_path, RESUME, [str(tmp_path / "resumed.json")], env)


@pytest.mark.parametrize("head", ["regression", "flow"])
def test_two_rank_resume_is_bit_exact(tmp_path, tiny_vl_dir, synth_dataset_dir, head):
    """4 steps on 2 ranks, vs. resuming both ranks from the `last` saved at step 2: same losses, and the
    final checkpoints hold identical tensors (weights and optimizer state)."""
    full = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "full", head=head, max_steps=4, save_every_steps=2)
    run_then_resume(tmp_path, full, env_for(tiny_vl_dir))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert set(a) == {1, 2, 3, 4} and set(b) == {3, 4}
    assert b == {s: a[s] for s in (3, 4)}
    last = "checkpoints/last/checkpoint.pt"
    assert_same_tensors(tensors_of(tmp_path / "full" / last), tensors_of(tmp_path / "resumed" / last))


TRAIN = """
    import sys
    from sensorvla.config import SensorVLAConfig
    from sensorvla.training.loop import train

    train(SensorVLAConfig.load(sys.argv[1]), progress=False)
"""


def test_two_rank_lora_with_a_middle_feature_layer(tmp_path, tiny_vl_dir, synth_dataset_dir):
    """Issue 19: DDP crashed ("parameters that did not receive grad") for LoRA with a feature layer other than the
    last: the adapters past it never reached the loss. Now only the layers before it are adapted, and they train."""
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path / "run", max_steps=2, val_max_samples=8)
    cfg.model.finetune.mode = "lora"  # stage 1 with LoRA (legal, with a warning): no stage-1 file needed
    cfg.model.backbone.feature_layer = 1  # of the tiny LM's 2 layers
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    torchrun_script(tmp_path, TRAIN, [str(tmp_path / "cfg.json")], env_for(tiny_vl_dir))
    assert set(losses(tmp_path / "run")) == {1, 2}
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "run" / "checkpoints" / "pretrained_model" / "adapter_model.safetensors")
    assert adapter and all(".layers.0." in k for k in adapter)  # layer 1 lies past the features
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B left zero: it trained
