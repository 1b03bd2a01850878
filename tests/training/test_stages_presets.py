"""Stages and presets as data: every preset validates, the seed presets are the seed guide's four commands,
a preset yields to flags, and the stage defaults come out the same from the CLI, Python and a JSON config."""

from __future__ import annotations

import copy

import pytest
from test_seed_commands import STAGE1_DIFF, STAGE1_REG, STAGE2_DIFF, STAGE2_REG

from sensorvla.cli import parse_train_config
from sensorvla.config import STAGES, ConfigError, SensorVLAConfig, check_stage_groups
from sensorvla.presets import PRESETS, apply_preset, pop_preset, preset_config

SEED_RUNS = {
    "seed-regression-stage1": STAGE1_REG,
    "seed-regression-stage2": STAGE2_REG,
    "seed-diffusion-stage1": STAGE1_DIFF,
    "seed-diffusion-stage2": STAGE2_DIFF,
}

GUIDE_STAGE1_FILES = {
    "seed-regression-stage2": "checkpoints/qwen_vla_sensor_best.pt",
    "seed-diffusion-stage2": "checkpoints/diffusion_epoch20.pt",
}


def test_presets_are_the_required_set():
    assert {"demo", "robot-3b", *SEED_RUNS} <= set(PRESETS)
    assert all(p.description for p in PRESETS.values())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_validates(name):
    cfg = preset_config(name)
    cfg.data.dataset_dir = "/data/x"
    cfg.validate()
    expected = STAGES[cfg.train.stage].defaults["model.finetune.mode"]
    if cfg.train.stage == "stage2" and cfg.model.backbone.feature_layer == 0:
        # features taken before the language model: no language-model layer reaches them, LoRA there is refused,
        # so such a stage 2 trains the vision tower in full instead
        expected = "none"
        assert cfg.model.finetune.full_vision
    assert cfg.model.finetune.mode == expected
    # the CLI gives the same config as Python
    assert parse_train_config(["--preset", name, "--dataset-dir", "/data/x"]).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", sorted(SEED_RUNS))
def test_seed_presets_equal_the_seed_guide_commands(name):
    """`--preset seed-...` resolves to exactly the config of the guide's command (copied in test_seed_commands)."""
    module, flags = SEED_RUNS[name]
    head = "diffusion" if module.endswith("diffusion") else "regression"
    guide = parse_train_config(flags, head)
    preset = parse_train_config(["--preset", name] + [f for f in flags if "dataset" in f or "/path" in f], head)
    # the guide's stage-1 file names (test_seed_commands points stage 2 at its own short stage-1 run)
    assert preset.train.stage1_checkpoint == GUIDE_STAGE1_FILES.get(name)
    guide.train.stage1_checkpoint = preset.train.stage1_checkpoint
    assert preset.to_dict() == guide.to_dict()


def test_demo_preset_is_the_demo_stage1_config(tmp_path):
    from sensorvla.demo import DemoSettings, base_config

    demo = base_config(tmp_path / "vl", tmp_path / "data", tmp_path / "out", "regression")
    demo.train.epochs = DemoSettings().stage1_epochs
    preset = preset_config("demo")
    for key in ("vl_model",):
        setattr(preset.model.backbone, key, getattr(demo.model.backbone, key))
    preset.data.dataset_dir, preset.train.output_dir = demo.data.dataset_dir, demo.train.output_dir
    assert preset.to_dict() == demo.to_dict()


def test_preset_then_override():
    cfg = parse_train_config(["--preset", "seed-regression-stage2", "--lr", "5e-5", "--lora-r=8"])
    assert cfg.train.lr == 5e-5 and cfg.model.finetune.lora_r == 8  # the flags win
    assert cfg.train.vl_lr == 1e-5 and cfg.train.epochs == 10 and cfg.train.stage == "stage2"  # the preset stays
    robot = parse_train_config(["--preset=robot-3b", "--training-stage", "stage2", "--stage1-checkpoint", "s1.pt"])
    assert robot.model.finetune.mode == "lora"  # the stage's default follows the stage the flags chose
    assert robot.train.global_batch_size == 128 and robot.model.backbone.activation_checkpointing
    assert pop_preset(["--a", "--preset", "demo", "--b=1"]) == ("demo", ["--a", "--b=1"])


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="--preset 'nope' is not a preset; choose one of"):
        apply_preset(SensorVLAConfig(), "nope")
    with pytest.raises(ConfigError, match="--preset needs a name"):
        pop_preset(["--preset"])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_stage_defaults_equal_from_cli_python_and_json(stage):
    extra = ["--stage1-checkpoint", "s1.pt"] if stage == "stage2" else []
    cli = parse_train_config(["--training-stage", stage, *extra])
    cli.validate()
    python = SensorVLAConfig()
    python.train.stage = stage
    python.train.stage1_checkpoint = "s1.pt" if extra else None
    raw_json = python.to_json()  # written before validation: finetune mode "auto"
    assert '"mode": "auto"' in raw_json
    python.validate()
    from_json = SensorVLAConfig.from_json(raw_json).validate()
    expected = STAGES[stage].defaults["model.finetune.mode"]
    assert cli.model.finetune.mode == python.model.finetune.mode == from_json.model.finetune.mode == expected
    assert python.to_dict() == from_json.to_dict()
    assert {k: v for k, v in cli.to_dict().items() if k != "model"}["train"] == python.to_dict()["train"]


def test_stage_declares_its_lr_groups():
    cfg = SensorVLAConfig()
    cfg.train.stage, cfg.model.finetune.mode = "stage1", "none"
    check_stage_groups(cfg, ["head", "fusion/no_decay", "sensor_encoder"])
    with pytest.raises(ConfigError, match=r"trains groups \['vl_lora'\]"):
        check_stage_groups(cfg, ["head", "vl_lora"])
    lora = copy.deepcopy(cfg)
    lora.train.stage, lora.model.finetune.mode = "stage2", "lora"
    check_stage_groups(lora, ["head", "vl_lora", "vl_lora/no_decay"])
    with pytest.raises(ConfigError, match="language"):
        check_stage_groups(lora, ["language"])


def test_stage2_requires_its_checkpoint_and_fsdp_needs_a_trained_backbone():
    cfg = SensorVLAConfig()
    cfg.train.stage = "stage2"
    with pytest.raises(ConfigError, match="Stage 2 training requires --stage1-checkpoint"):
        cfg.validate()
    cfg = SensorVLAConfig()
    cfg.train.strategy = "fsdp"
    with pytest.raises(ConfigError, match="--train.strategy fsdp"):
        cfg.validate()  # stage 1: frozen backbone
    cfg.model.finetune.mode = "lora"
    cfg.validate()  # LoRA under FSDP2 is allowed now
