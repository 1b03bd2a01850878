"""Named training configs (`sensorvla train --preset NAME`), in the manner of openpi's named train configs.

A preset is data: dotted config keys -> values, applied on top of `SensorVLAConfig()` defaults; the command
line's flags then override it (`--preset seed-regression-stage2 --lr 5e-5`). Stage defaults (`--finetune-vl
auto`) are resolved afterwards by `validate()` from `config.STAGES`, so a preset that leaves the finetune mode
alone follows whatever stage the command line picks. Python: `preset_config("demo")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sensorvla.config import ConfigError, SensorVLAConfig, coerce, get_key, set_key


@dataclass(frozen=True)
class Preset:
    """One named config: what it is for and the config keys it sets."""

    name: str
    description: str
    values: dict[str, Any]


# The seed guide's four runs (docs/... /2-stage-training-guide.md, "Quick Start"): 4 GPUs x batch 4 x
# accumulation 8 = a global batch of 128. Stage 2 reads the stage-1 file the guide names.
_SEED_COMMON = {"train.batch_size": 4, "train.grad_accum_steps": 8, "train.lr": 1e-4}
_SEED_STAGE2 = {
    **_SEED_COMMON,
    "train.stage": "stage2",
    "model.finetune.mode": "lora",
    "model.finetune.lora_r": 16,
    "model.finetune.lora_alpha": 32,
    "model.finetune.lora_dropout": 0.05,
    "train.vl_lr": 1e-5,
    "train.epochs": 10,
}


@dataclass
class DemoSettings:
    """The recipe of `sensorvla demo` (the `demo` preset is its stage 1); `quick()` is the < 2 minute variant."""

    episodes: int = 300
    image_size: int = 112
    patch_size: int = 7  # tiny vision tower: 112 px views -> 16 x 16 patches -> 8 x 8 merged tokens
    pooling: str = "all"
    grid_size: int = 4
    feature_layer: int = 0  # the vision tower's output at the image positions (before the random LLM)
    keypoints: int = 0  # K > 0: K spatial-softmax keypoint tokens per view instead of every token (models/keypoints.py)
    stage1_epochs: int = 7
    stage2_steps: int = 40
    stage2_lr: float = 1e-4
    stage2_shift: float = 0.02  # stage-2 random shift; the cameras are fixed, so absolute position matters
    batch_size: int = 16
    head_layers: int = 2  # decoder layers of the action expert (each is ~30 % of a cached stage-1 step)
    # width of the sensor encoder's Transformer: 64 scored as well as 128 (95 %, lower val loss) at 0.7x the step
    sensor_hidden: int = 64
    lr: float = 1e-3
    rollouts: int = 20
    eval_samples: int = 128  # offline evaluation: the first N held-out samples (5 passes with the ablations)
    val_samples: int = 384  # validation per epoch on an evenly spaced subset of the val split
    baseline: bool = True
    view_dropout: float = 0.0
    sensor_dropout: float = 0.1
    sensor_samples: int = 16  # T_s: grid points of the 0.1 s sensor window
    encoder_dropout: float = 0.0  # dropout inside the sensor encoder (a third of its CPU time at 0.1)
    flow_noise_scale: float = 0.0  # flow head: sample from the mode (the demos are unimodal; docs/decisions.md)

    @classmethod
    def quick(cls) -> DemoSettings:
        """The < 2 min variant (`sensorvla demo --quick`): fewer episodes, epochs, steps, rollouts; no CNN."""
        return cls(episodes=120, stage1_epochs=4, stage2_steps=10, rollouts=6, eval_samples=64, baseline=False)

    def config_values(self, head: str = "regression") -> dict[str, Any]:
        """The stage-1 config keys of this recipe (dotted key -> value) for `head`."""
        px = self.image_size * self.image_size
        values: dict[str, Any] = {
            "model.backbone.pooling": self.pooling,
            "model.backbone.grid_size": self.grid_size,
            "model.backbone.min_pixels": px,
            "model.backbone.max_pixels": px,
            "model.backbone.feature_layer": self.feature_layer,
            "model.backbone.keypoints": self.keypoints,
            "model.head.type": head,
            "model.head.loss": "mse",
            "model.head.num_layers": self.head_layers,
            "model.view_dropout": self.view_dropout,
            "model.sensor_dropout": self.sensor_dropout,
            "model.sensor.dropout": self.encoder_dropout,
            "model.sensor.hidden_dim": self.sensor_hidden,
            "data.sensor_samples": self.sensor_samples,
            "train.batch_size": self.batch_size,
            "train.grad_accum_steps": 1,
            "train.lr": self.lr,
            "train.sensor_lr": self.lr,
            "train.vl_lr": 1e-4,
            "train.vision_lr": 1e-4,
            "train.warmup_ratio": 0.05,
            "train.patience": 0,
            "train.val_max_samples": self.val_samples,
            "train.log_every_steps": 50,
            "train.epochs": self.stage1_epochs,
        }
        if head == "flow":
            values["model.head.noise_scale"] = self.flow_noise_scale
        return values

    def stage2_values(self, head: str = "regression") -> dict[str, Any]:
        """The stage-2 config keys (dotted key -> value): what makes the demo *see*. Stage 1's architecture, then
        the whole vision tower trained (the features are taken at feature layer 0, before the language model,
        so no language-model layer reaches them and none is adapted: no LoRA), random shift `stage2_shift` (the
        cameras are fixed, so absolute position matters), one LR for every group, 10 % warmup, `stage2_steps`
        steps. Add --train.stage1-checkpoint."""
        lr = self.stage2_lr
        return {
            **self.config_values(head),
            "train.stage": "stage2",
            "model.finetune.mode": "none",
            "model.finetune.full_vision": True,
            "data.augment.enabled": True,
            "data.augment.shift_frac": self.stage2_shift,
            "train.epochs": 1,
            "train.max_steps": self.stage2_steps,
            "train.lr": lr,
            "train.sensor_lr": lr,
            "train.vl_lr": lr,
            "train.vision_lr": lr,
            "train.warmup_ratio": 0.1,
        }


# A small dataset of the user's own task (tens of demos): the demo's seeing recipe without its pixel bounds (they
# depend on the views and the backbone: the run logs the token grid and warns at <= 4 x 4 tokens per view), more
# stage-1 epochs (50 demos are a sixth of the demo's data), a longer stage 2 (160 steps: 95 % against 80 % with the
# demo's 40 on the MuJoCo peg-in-hole, `sensorvla bench sim`, docs/decisions.md), and a split that trains on all
# but 10 % for validation. Keypoint tokens (16 per view, a spatial softmax over each view's token map, as the plain
# CNN reads its feature maps): 40/40 against 35/40 with every token on the MuJoCo peg-in-hole, sensor ablated 40/40
# against 35/40, at the same budget; the CNN on those CPU-seconds 34/40 and 36/40 without force (docs/decisions.md,
# "Keypoint tokens").
SMALL_DATA = DemoSettings(stage1_epochs=20, stage2_steps=160, keypoints=16)
_SMALL_SPLIT = {"data.val_fraction": 0.1, "data.test_fraction": 0.0}
_PIXEL_KEYS = ("model.backbone.min_pixels", "model.backbone.max_pixels")


SMALL_DATA_RUNS = "runs"  # stage 1 writes runs/stage1, stage 2 reads its best checkpoint and writes runs/stage2


def small_data_values(stage: str) -> dict[str, Any]:
    """The `small-data-stage1` / `small-data-stage2` preset keys (stage: "stage1" or "stage2")."""
    values = SMALL_DATA.config_values() if stage == "stage1" else SMALL_DATA.stage2_values()
    values = {**{k: v for k, v in values.items() if k not in _PIXEL_KEYS}, **_SMALL_SPLIT}
    values["train.output_dir"] = f"{SMALL_DATA_RUNS}/{stage}"
    if stage == "stage2":
        values["train.stage1_checkpoint"] = f"{SMALL_DATA_RUNS}/stage1/checkpoints/qwen_vla_sensor_best.pt"  # BEST_NAME
    return values


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "demo",
            "stage 1 of `sensorvla demo` (DemoSettings().config_values()): the tiny Qwen-VL on the synthetic task; "
            "pass --vl-model and --dataset-dir (the demo builds both under out/)",
            DemoSettings().config_values(),
        ),
        Preset(
            "small-data-stage1",
            "stage 1 for a small dataset of your own task (tens of demos): the demo's recipe (the vision tower's "
            "output tokens, MSE regression head, sensor dropout 0.1, LR 1e-3) read out as 16 spatial-softmax "
            "keypoint tokens per view, 20 epochs, a tenth of the episodes for validation and no test split; set the "
            "pixel bounds for >= 8x8 tokens per view",
            small_data_values("stage1"),
        ),
        Preset(
            "small-data-stage2",
            "stage 2 after small-data-stage1 (add --train.stage1-checkpoint): the whole vision tower trained "
            "(no LoRA: no language-model layer reaches the features), random shift 0.02, LR 1e-4 for every group, "
            "warmup over a tenth, 160 steps",
            small_data_values("stage2"),
        ),
        Preset(
            "seed-regression-stage1",
            "the seed guide's regression stage 1: frozen VL, sensor encoder + action expert, 20 epochs",
            {
                **_SEED_COMMON,
                "train.stage": "stage1",
                "model.head.type": "regression",
                "model.finetune.mode": "none",
                "model.sensor.enabled": True,
                "model.fusion.strategy": "concat",
                "train.sensor_lr": 5e-4,
                "train.epochs": 20,
            },
        ),
        Preset(
            "seed-regression-stage2",
            "the seed guide's regression stage 2: LoRA r16/a32 from checkpoints/qwen_vla_sensor_best.pt, 10 epochs",
            {
                **_SEED_STAGE2,
                "model.head.type": "regression",
                "model.sensor.enabled": True,
                "model.fusion.strategy": "concat",
                "train.sensor_lr": 5e-4,
                "train.stage1_checkpoint": "checkpoints/qwen_vla_sensor_best.pt",
            },
        ),
        Preset(
            "seed-diffusion-stage1",
            "the seed guide's diffusion stage 1: 100 diffusion timesteps, 20 epochs",
            {
                **_SEED_COMMON,
                "train.stage": "stage1",
                "model.head.type": "diffusion",
                "model.head.diffusion_timesteps": 100,
                "train.epochs": 20,
            },
        ),
        Preset(
            "seed-diffusion-stage2",
            "the seed guide's diffusion stage 2: LoRA r16/a32 from checkpoints/diffusion_epoch20.pt, 10 epochs",
            {
                **_SEED_STAGE2,
                "model.head.type": "diffusion",
                "model.head.diffusion_timesteps": 100,
                "train.stage1_checkpoint": "checkpoints/diffusion_epoch20.pt",
            },
        ),
        Preset(
            "robot-3b",
            "a real robot with Qwen2.5-VL-3B: stage 1 from the VL cache (add --training-stage stage2 "
            "--stage1-checkpoint ... for LoRA), a global batch of 128 at any GPU count, activation "
            "checkpointing (stage 2 at batch 4 then fits 24 GB cards, docs/scaling.md), flow head, "
            "modality dropout against a dead camera or sensor",
            {
                "model.backbone.vl_model": "Qwen/Qwen2.5-VL-3B-Instruct",
                "model.backbone.activation_checkpointing": True,
                "model.head.type": "flow",
                "model.view_dropout": 0.1,
                "model.sensor_dropout": 0.1,
                "train.batch_size": 4,
                "train.global_batch_size": 128,
                "train.sensor_lr": 5e-4,
                "train.use_cache": "auto",
            },
        ),
    )
}


def apply_preset(cfg: SensorVLAConfig, name: str) -> SensorVLAConfig:
    """Set the preset's keys on `cfg` in place (type-checked); `ConfigError` naming the presets when unknown."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not a preset; choose one of {sorted(PRESETS)}")
    return apply_values(cfg, PRESETS[name].values)


def apply_values(cfg: SensorVLAConfig, values: dict[str, Any]) -> SensorVLAConfig:
    """Set dotted config keys on `cfg` in place, each value type-checked against its field."""
    for key, value in values.items():
        get_key(cfg, key)  # the key exists
        set_key(cfg, key, coerce(value, _hint(key), key))
    return cfg


def preset_config(name: str) -> SensorVLAConfig:
    """`SensorVLAConfig()` with preset `name` applied (not yet validated: add the dataset, then `validate()`)."""
    return apply_preset(SensorVLAConfig(), name)


def pop_preset(args: list[str]) -> tuple[str | None, list[str]]:
    """(the `--preset NAME` / `--preset=NAME` value or None, the other arguments); the last one given wins."""
    name, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--preset":
            if i + 1 >= len(args):
                raise ConfigError(f"--preset needs a name; choose one of {sorted(PRESETS)}")
            name, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--preset="):
            name = args[i].partition("=")[2]
        else:
            rest.append(args[i])
        i += 1
    return name, rest


def preset_help() -> str:
    """One line per preset, for `--help`."""
    return "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())


def _hint(key: str) -> Any:
    import dataclasses
    import typing

    cls: Any = SensorVLAConfig
    *parents, leaf = key.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    hints = typing.get_type_hints(cls)
    assert leaf in {f.name for f in dataclasses.fields(cls)}, key
    return hints[leaf]
