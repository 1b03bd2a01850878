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
from sensorvla.models import policy as policy_module
from sensorvla.models.backbone import load_vl_model
from sensorvla.models.folder import CheckpointMismatchError
from sensorvla.models.policy import load_pretrained
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
    build = policy_module.build_policy
    with pytest.MonkeyPatch.context() as mp:  # train() imports build_policy from the module at call time
        mp.setattr(policy_module, "build_policy", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
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
    every = ["adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors", "norm_stats.json"]
    assert sorted(manifest) == every and manifest == {n: integrity.file_sha256(pm / n) for n in every}
    policy, _, _ = load_pretrained(pm)  # intact: loads
    flip_data_bytes(pm / name)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(pm)
    msg = str(err.value)
    assert str(pm / name) in msg and "sha256" in msg and "Copy it again" in msg
    (pm / integrity.MANIFEST_NAME).unlink()  # the documented escape hatch: the check is skipped (with a warning)
    load_pretrained(pm)


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
        load_pretrained(pm)
    msg = str(err.value)
    assert str(pm / "config.json") in msg and f"model.{section}.{key}" in msg and repr(value) in msg, msg


class NotATensor:
    """Anything torch.save would pickle: a checkpoint must never make us run its code."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "sensor_encoder": NotATensor(), "training_stage": "stage1"}, path)
    with pytest.raises(CheckpointMismatchError, match="never unpickles"):
        ckpt.load_seed_checkpoint(path)


# --- issue 19: the manifest covers every file; norm stats are validated at load ------------------------------
def _edit_stats(pm: Path, edit) -> None:
    d = json.loads((pm / "norm_stats.json").read_text())
    edit(d["stats"]["actions"])
    (pm / "norm_stats.json").write_text(json.dumps(d))


def test_edited_norm_stats_fail_the_manifest_check(runs, tmp_path):
    """Action std x10 would load silently and shift every action: the manifest covers norm_stats.json."""
    pm = copy_folder(runs["s2"] / "pretrained_model", tmp_path / "pm")
    _edit_stats(pm, lambda a: a.update(std=[v * 10 for v in a["std"]]))
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(pm)
    assert str(pm / "norm_stats.json") in str(err.value) and "sha256" in str(err.value)


@pytest.mark.parametrize(
    "what,edit,needle",
    [
        ("negated std", lambda a: a.update(std=[-v for v in a["std"]]), "'std'] is negative"),
        ("std as strings", lambda a: a.update(std=[str(v) for v in a["std"]]), "must be a list of numbers"),
        ("std of the wrong length", lambda a: a.update(std=a["std"][:-1]), "different lengths"),
        ("every stat one short", lambda a: a.update({k: v[:-1] for k, v in a.items()}), "channels, the model"),
        ("NaN mean", lambda a: a.update(mean=[float("nan")] * len(a["mean"])), "holds NaN/inf"),
        ("q01 above q99", lambda a: a.update(q01=[v + 1e6 for v in a["q99"]]), "q01 > q99"),
    ],
)
def test_invalid_norm_stats_are_refused_at_load(runs, tmp_path, caplog, what, edit, needle):
    """Even without a manifest (the documented escape hatch), stats that would normalize wrongly never load."""
    pm = copy_folder(runs["s2"] / "pretrained_model", tmp_path / "pm")
    (pm / integrity.MANIFEST_NAME).unlink()
    _edit_stats(pm, edit)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(pm)
    msg = str(err.value)
    assert str(pm / "norm_stats.json") in msg and needle in msg and "sensorvla stats" in msg, (what, msg)


def test_truncated_norm_stats_error_names_the_file(runs, tmp_path):
    pm = copy_folder(runs["s2"] / "pretrained_model", tmp_path / "pm")
    (pm / integrity.MANIFEST_NAME).unlink()
    raw = (pm / "norm_stats.json").read_bytes()
    (pm / "norm_stats.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(pm)
    assert str(pm / "norm_stats.json") in str(err.value) and "not readable JSON" in str(err.value)


def test_empty_or_partial_manifests_are_refused_naming_the_fix(runs, tmp_path):
    pm = copy_folder(runs["s2"] / "pretrained_model", tmp_path / "pm")
    record = pm / integrity.MANIFEST_NAME
    full = json.loads(record.read_text())
    flip_data_bytes(pm / "model.safetensors")
    record.write_text(json.dumps({**full, "sha256": {}}))  # lists nothing: the flipped bytes must not load
    with pytest.raises(CheckpointMismatchError, match="lists no files") as err:
        load_pretrained(pm)
    assert f"python -m sensorvla.integrity {pm}" in str(err.value)
    partial = {k: v for k, v in full["sha256"].items() if k != "norm_stats.json"}
    record.write_text(json.dumps({**full, "sha256": partial}))
    with pytest.raises(CheckpointMismatchError, match="partial manifest") as err:
        load_pretrained(pm)
    assert "norm_stats.json" in str(err.value)
    record.write_text(json.dumps({**full, "sha256": {**full["sha256"], "../outside.json": "0" * 64}}))
    with pytest.raises(CheckpointMismatchError, match="outside"):
        load_pretrained(pm)


def test_an_older_weights_only_manifest_loads_with_a_warning_and_the_fix_upgrades_it(runs, tmp_path, caplog):
    import subprocess
    import sys

    pm = copy_folder(runs["s2"] / "pretrained_model", tmp_path / "pm")
    weights = ("model.safetensors", "adapter_model.safetensors")
    legacy = {"format": "sensorvla-sha256-1", "sha256": {n: integrity.file_sha256(pm / n) for n in weights}}
    (pm / integrity.MANIFEST_NAME).write_text(json.dumps(legacy))
    with caplog.at_level("WARNING"):
        load_pretrained(pm)
    assert "older sensorvla" in caplog.text and "NOT integrity-checked" in caplog.text
    assert f"python -m sensorvla.integrity {pm}" in caplog.text
    del legacy["sha256"]["adapter_model.safetensors"]  # an old manifest must still cover every weight file
    (pm / integrity.MANIFEST_NAME).write_text(json.dumps(legacy))
    with pytest.raises(CheckpointMismatchError, match="does not cover the weight files"):
        load_pretrained(pm)
    r = subprocess.run([sys.executable, "-m", "sensorvla.integrity", str(pm)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_pretrained(pm)
    assert "integrity" not in caplog.text
    _edit_stats(pm, lambda a: a.update(std=[v * 10 for v in a["std"]]))
    with pytest.raises(CheckpointMismatchError, match="norm_stats.json"):
        load_pretrained(pm)


def test_last_manifest_covers_every_file(runs, tmp_path):
    s1 = copy_folder(runs["s1"], tmp_path / "ck")
    last = s1 / "last"
    listed = json.loads((last / integrity.MANIFEST_NAME).read_text())["sha256"]
    assert sorted(listed) == sorted(p.name for p in last.iterdir() if p.name != integrity.MANIFEST_NAME)
    state = json.loads((last / "training_state.json").read_text())
    state["global_step"] = state.get("global_step", 0) + 1000
    (last / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointMismatchError, match=r"--resume: .*training_state\.json"):
        ckpt.load_last(s1)


DISK_FULL = """
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from sensorvla.training import checkpoint as ckpt

    out = Path(sys.argv[1])
    rng = [ckpt.rng_state()]
    ckpt.save_last(out, {"epoch": 1, "w": torch.zeros(10)}, {"step": 1}, rng)
    ckpt.save_seed_file(out / ckpt.BEST_NAME, {"epoch": 1, "w": torch.zeros(10)})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    big = {"epoch": 2, "w": torch.zeros(1_000_000)}
    errors = {}
    for name, save in (
        ("last", lambda: ckpt.save_last(out, big, {"step": 2}, rng)),
        ("best", lambda: ckpt.save_seed_file(out / ckpt.BEST_NAME, big)),
    ):
        try:
            save()
        except ckpt.CheckpointWriteError as e:
            errors[name] = str(e)
    payload, state, _ = ckpt.load_last(out)
    best = ckpt.load_seed_checkpoint(out / ckpt.BEST_NAME)
    print(json.dumps({"errors": errors, "last_step": state["step"], "best_epoch": best["epoch"]}))
"""


def test_a_full_disk_names_the_disk_and_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    """Issue 19: a failed checkpoint write gave torch's raw RuntimeError ("PytorchStreamWriter failed writing
    file"), naming neither the disk nor the path. A write limit (RLIMIT_FSIZE) fails real writes the same way."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "disk_full.py"
    script.write_text(textwrap.dedent(DISK_FULL))
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpts")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["errors"]) == {"last", "best"}, out
    for name, path in (("last", tmp_path / "ckpts" / "last"), ("best", tmp_path / "ckpts" / ckpt.BEST_NAME)):
        msg = out["errors"][name]
        assert "disk may be full" in msg and "GB free on the disk holding" in msg and str(path) in msg, msg
        assert "--train.output-dir" in msg
    assert (out["last_step"], out["best_epoch"]) == (1, 1)  # the previous checkpoints are intact


def _draws() -> tuple:
    import random

    import numpy as np

    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()


def test_rng_state_round_trips_through_last_and_old_packed_files_still_load(tmp_path):
    """`rng.pt` holds the states as `rng_state` gives them (numpy's array read back through torch's
    `safe_globals`, `weights_only` loading); an rng.pt that packed them into tensors still restores."""
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # a cached Gaussian in numpy's state
    state = ckpt.rng_state()
    expected = _draws()
    ckpt.save_last(tmp_path, {"a": torch.zeros(1)}, {"step": 1}, [state])
    _, _, rngs = ckpt.load_last(tmp_path)
    assert rngs[0]["numpy"][1].dtype == np.uint32 and rngs[0]["python"] == state["python"]  # saved as they are
    ckpt.restore_rng(rngs[0])
    assert _draws() == expected
    legacy = {  # the tensors the checkpoints of 2026-12-06 and before wrote
        "torch": state["torch"],
        "numpy_keys": torch.from_numpy(np.asarray(state["numpy"][1], dtype=np.int64)),
        "numpy_meta": torch.tensor([state["numpy"][2], state["numpy"][3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([state["numpy"][4]], dtype=torch.float64),
        "python": torch.tensor(list(state["python"][1]), dtype=torch.int64),
        "python_version": torch.tensor([state["python"][0]], dtype=torch.int64),
    }
    ckpt.restore_rng(legacy)
    assert _draws() == expected
