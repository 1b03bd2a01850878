"""Checkpoint integrity (sha256 manifests and sidecars), typed config.json at load, and a real stage-2
`train()` from Python: LoRA by default, the frozen base bit-equal after AdamW with weight decay."""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from test_train import tiny_cfg

from sensorvla import integrity
from sensorvla.models import pretrained
from sensorvla.models.backbone import load_vl_model
from sensorvla.models.pretrained import CheckpointMismatchError, from_pretrained
from sensorvla.training import checkpoint as ckpt
from sensorvla.training.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vl_dir, synth_dataset_dir):
    """Stage 1 (2 steps), then stage 2 through `train(cfg)` from Python with the finetune mode left at its
    default; the in-memory stage-2 policy is captured at the end of training."""
    root = tmp_path_factory.mktemp("ckpt_runs")
    s1 = tiny_cfg(tiny_vl_dir, synth_dataset_dir, root / "s1", max_steps=2)
    train(s1, progress=False)
    s2 = copy.deepcopy(s1)
    s2.train.output_dir = str(root / "s2")
    s2.train.stage, s2.train.stage1_checkpoint = "stage2", str(root / "s1" / "checkpoints" / ckpt.BEST_NAME)
    s2.train.max_steps, s2.train.weight_decay = 3, 0.5  # strong decoupled decay: frozen weights must not see it
    s2.train.lr = s2.train.vl_lr = s2.train.sensor_lr = 1e-2
    s2.model.finetune.mode = "auto"  # the default: stage 2 -> LoRA
    built = []
    build = pretrained.build_policy
    with pytest.MonkeyPatch.context() as mp:  # train() imports build_policy from the module at call time
        mp.setattr(pretrained, "build_policy", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
        train(s2, progress=False)
    return {"s1": root / "s1" / "checkpoints", "s2": root / "s2" / "checkpoints", "policy": built[-1]}


def test_stage2_from_python_defaults_to_lora(runs):
    pm = runs["s2"] / "pretrained_model"
    assert json.loads((pm / "config.json").read_text())["model"]["finetune"]["mode"] == "lora"
    assert (pm / "adapter_model.safetensors").exists()
    lora = {n: p for n, p in runs["policy"].named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # LoRA B starts at zero: it trained


def test_frozen_base_bit_equal_after_stage2_train(runs, tiny_vl_dir):
    """AdamW with weight decay 0.5 and lr 1e-2 for 3 steps: every non-LoRA base tensor is unchanged."""
    fresh = load_vl_model(str(tiny_vl_dir), dtype=torch.float32).model.state_dict()  # the base VLBackbone wraps
    base = runs["policy"].backbone.model.state_dict()
    compared = 0
    for name, t in base.items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        assert torch.equal(t.cpu(), fresh[key]), name
        compared += 1
    assert compared == len(fresh) > 50


def flip_data_bytes(path: Path, count: int = 100) -> None:
    """Flip `count` bytes spread over the tensor data of a safetensors file (header left intact)."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
    step = max(1, (len(raw) - start) // count)
    for i in range(count):
        raw[start + i * step] ^= 0xFF
    path.write_bytes(bytes(raw))


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["model.safetensors", "adapter_model.safetensors"])
def test_flipped_weight_bytes_fail_loading_naming_the_file(runs, tmp_path, name):
    pm = copy_folder(runs["s2"] / "pretrained_model", tmp_path / "pm")
    manifest = json.loads((pm / integrity.MANIFEST_NAME).read_text())["sha256"]
    assert manifest == {n: integrity.file_sha256(pm / n) for n in ("model.safetensors", "adapter_model.safetensors")}
    policy, _, _ = from_pretrained(pm)  # intact: loads
    flip_data_bytes(pm / name)
    with pytest.raises(CheckpointMismatchError) as err:
        from_pretrained(pm)
    msg = str(err.value)
    assert str(pm / name) in msg and "sha256" in msg and "Copy it again" in msg
    (pm / integrity.MANIFEST_NAME).unlink()  # the documented escape hatch: the check is skipped (with a warning)
    from_pretrained(pm)


def test_seed_files_and_last_are_checked(runs, tmp_path):
    s1 = copy_folder(runs["s1"], tmp_path / "ck")
    best = s1 / ckpt.BEST_NAME
    assert integrity.recorded_sha256(best) == [integrity.file_sha256(best)]
    raw = bytearray(best.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 100] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 : len(raw) // 2 + 100])
    best.write_bytes(bytes(raw))
    with pytest.raises(CheckpointMismatchError, match=str(best)):
        ckpt.load_seed_checkpoint(best)
    assert ckpt.finite_checkpoint(best) is None  # a divergence message would never point at it
    last = s1 / "last"
    ckpt.load_last(s1)  # intact
    data = bytearray((last / "checkpoint.pt").read_bytes())
    data[-200] ^= 0xFF
    (last / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointMismatchError, match=r"--resume: .*checkpoint\.pt"):
        ckpt.load_last(s1)


def test_sidecar_survives_a_replacement(tmp_path):
    """While a seed file is being replaced both hashes are accepted, so a kill in between never breaks it."""
    path = tmp_path / "x.pt"
    ckpt.save_seed_file(path, {"a": torch.zeros(3)})
    first = integrity.file_sha256(path)
    ckpt.save_seed_file(path, {"a": torch.ones(3)})
    assert integrity.recorded_sha256(path) == [integrity.file_sha256(path)] != [first]
    integrity.write_sidecar(path, "0" * 64, previous=integrity.file_sha256(path))  # state mid-replacement
    assert integrity.verify_sidecar(path) == []
    integrity.write_sidecar(path, "0" * 64)
    assert integrity.verify_sidecar(path)


@pytest.mark.parametrize(
    "section,key,value",
    [("head", "horizon", "eight"), ("sensor", "hidden_dim", "256"), ("head", "num_layers", 2.5)],
)
def test_bad_config_json_types_fail_at_load(runs, tmp_path, section, key, value):
    pm = copy_folder(runs["s1"] / "pretrained_model", tmp_path / "pm")
    cfg = json.loads((pm / "config.json").read_text())
    cfg["model"][section][key] = value
    (pm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError) as err:
        from_pretrained(pm)
    msg = str(err.value)
    assert str(pm / "config.json") in msg and f"model.{section}.{key}" in msg and repr(value) in msg, msg


class NotATensor:
    """Anything torch.save would pickle: a checkpoint must never make us run its code."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "sensor_encoder": NotATensor(), "training_stage": "stage1"}, path)
    with pytest.raises(CheckpointMismatchError, match="never unpickles"):
        ckpt.load_seed_checkpoint(path)
