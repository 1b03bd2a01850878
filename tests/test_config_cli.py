"""Typed config round trip, validation messages, the seed-flag translation and import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sensorvla.cli import SEED_ALIASES, parse_train_config, rewrite_seed_flags
from sensorvla.config import ConfigError, SensorVLAConfig


def test_config_json_round_trip():
    cfg = SensorVLAConfig()
    cfg.model.head.type = "flow"
    cfg.data.views = ("a", "b")
    cfg.data.mixture = ("x:1.0",)
    again = SensorVLAConfig.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.data.views, tuple)


def test_unknown_key_is_rejected():
    d = SensorVLAConfig().to_dict()
    d["train"]["learning_rate"] = 1
    with pytest.raises(ConfigError, match="train.learning_rate"):
        SensorVLAConfig.from_dict(d)


@pytest.mark.parametrize(
    "mutate,flag",
    [
        (lambda c: setattr(c.train, "batch_size", 0), "--train.batch-size"),
        (lambda c: setattr(c.model.head, "type", "gan"), "--model.head.type"),
        (lambda c: setattr(c.model.fusion, "strategy", "sum"), "--model.fusion.strategy"),
        (lambda c: setattr(c.data, "mixture", ("nopath",)), "--data.mixture"),
        (
            lambda c: (setattr(c.model.head, "num_inference_steps", 500), setattr(c.model.head, "type", "diffusion")),
            "--model.head.num-inference-steps",
        ),
    ],
)
def test_validation_names_the_flag(mutate, flag):
    cfg = SensorVLAConfig()
    mutate(cfg)
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        cfg.validate()


def test_stage2_requires_checkpoint_message():
    cfg = SensorVLAConfig()
    cfg.train.stage = "stage2"
    with pytest.raises(ConfigError, match="Stage 2 training requires --stage1-checkpoint"):
        cfg.validate()


def test_seed_flags_both_spellings():
    a = parse_train_config(
        [
            "--grad_accum",
            "3",
            "--batch_size",
            "5",
            "--dataset_dir",
            "/d",
            "--diffusion_timesteps",
            "50",
            "--sensor_loss_weight",
            "3",
        ],
        "diffusion",
    )
    b = parse_train_config(
        [
            "--grad-accum-steps",
            "3",
            "--batch-size",
            "5",
            "--dataset-dir",
            "/d",
            "--diffusion-timesteps",
            "50",
            "--sensor-loss-weight",
            "3",
        ],
        "diffusion",
    )
    assert a == b
    assert (a.train.grad_accum_steps, a.train.batch_size, a.data.dataset_dir) == (3, 5, "/d")
    assert a.model.head.diffusion_timesteps == 50 and a.train.sensor_loss_weight == 3
    assert a.model.head.type == "diffusion"


def test_seed_defaults_per_stage():
    s1 = parse_train_config(["--training-stage", "stage1"])
    s2 = parse_train_config(["--training-stage", "stage2", "--stage1-checkpoint", "x.pt"])
    assert s1.model.finetune.mode == "none" and s2.model.finetune.mode == "lora"
    assert (s2.model.finetune.lora_r, s2.model.finetune.lora_alpha, s2.model.finetune.lora_dropout) == (16, 32, 0.05)
    assert (s1.train.lr, s1.train.sensor_lr, s1.train.vl_lr) == (1e-4, 5e-4, 1e-5)
    assert s1.model.head.diffusion_timesteps == 100 and s1.train.grad_accum_steps == 8
    assert s1.train.sensor_loss_weight == 2.0 and s1.train.mode == "train"
    off = parse_train_config(["--no-sensor-enabled", "--fusion-strategy", "gated", "--finetune-vl", "full"])
    assert off.model.sensor.enabled is False and off.model.fusion.strategy == "gated"
    assert off.model.finetune.mode == "full"


def test_every_alias_target_exists():
    for target in set(SEED_ALIASES.values()):
        if target.endswith("no-enabled"):
            continue
        value = {"--train.resume": []}.get(target, ["1"])
        args = [target, *value] if target not in ("--model.sensor.enabled",) else [target]
        if target in ("--train.stage",):
            args = [target, "stage1"]
        elif target in ("--train.mode",):
            args = [target, "cache"]
        elif target in ("--model.finetune.mode",):
            args = [target, "none"]
        elif target in ("--model.fusion.strategy",):
            args = [target, "gated"]
        elif target in ("--model.head.type",):
            args = [target, "flow"]
        parse_train_config(args)
    assert rewrite_seed_flags(["--grad_accum=4"]) == ["--train.grad-accum-steps=4"]


def test_imports_touch_nothing(tmp_path):
    """Importing every module reads no file of ours, starts no thread and loads no model."""
    code = (
        "import pkgutil, importlib, sensorvla, threading, json;"
        "mods=[m.name for m in pkgutil.walk_packages(sensorvla.__path__, 'sensorvla.') "
        "if not m.name.endswith(('__main__',)) and m.name not in ('sensorvla.train','sensorvla.train_diffusion')];"
        "[importlib.import_module(m) for m in mods];"
        "print(json.dumps({'n': len(mods), 'threads': threading.active_count()}))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] > 20 and out["threads"] == 1
    assert list(tmp_path.iterdir()) == []
