"""Typed configuration: the single source of truth for model, data, training stage, head and runtime.

Every checkpoint stores the resolved `SensorVLAConfig` as JSON; `SensorVLAConfig.from_dict(cfg.to_dict())`
gives an equal object. Loading checks every value's type against the field's annotation (pydantic, strict JSON
types; its errors are translated into `ConfigError`s naming the key and the flag). `validate()`
(called by the CLI and trainer before any distributed init) also applies the stage defaults, so
`train(cfg)` from Python, a JSON config and the CLI behave alike; every error names the flag to change.
This module touches no file on import. Each field's `#:` comment (directly above it) is its documentation and
the help text of its flag (`sensorvla train --help`; tests/test_config_cli.py checks every flag).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from sensorvla.streams import StreamSpecError, model_streams

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The action heads' registry: `--model.head.type` -> "module:Class", imported when a policy is built
#: (`models/heads/__init__.py: build_head`). A new head is its module plus one line here; `HeadType` follows.
HEADS: dict[str, str] = {
    "regression": "sensorvla.models.heads.regression:RegressionHead",
    "diffusion": "sensorvla.models.heads.diffusion:DiffusionHead",
    "flow": "sensorvla.models.heads.flow:FlowHead",
}
HeadType = Literal[tuple(HEADS)]  # type: ignore[valid-type]
FusionStrategy = Literal["concat", "cross_attention", "gated"]
# "auto" (the default) resolves in `validate()`: stage 1 -> none, stage 2 -> lora (the seed guide).
FinetuneMode = Literal["auto", "none", "lora", "full"]
Stage = Literal["stage1", "stage2"]

DEFAULT_VL_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
# LoRA on the language model's attention projections only. A plain list of names would also hit the
# Qwen2.5-VL vision MLP (gate/up/down_proj), see docs/decisions.md.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
# `--lora-targets` presets -> regexes over the HF base model's module names (full match, Linear only).
LORA_TARGET_PRESETS = {
    "language": DEFAULT_LORA_TARGETS,
    "vision": r"visual\..*",
    "all": rf"(?:{DEFAULT_LORA_TARGETS})|(?:visual\..*)",
}

# Seed-guide flag (hyphenated) -> dotted config flag; `--a-b` and `--a_b` are both accepted (`sensorvla.cli.train`).
SEED_ALIASES = {
    "--training-stage": "--train.stage",
    "--stage1-checkpoint": "--train.stage1-checkpoint",
    "--finetune-vl": "--model.finetune.mode",
    "--lora-r": "--model.finetune.lora-r",
    "--lora-alpha": "--model.finetune.lora-alpha",
    "--lora-dropout": "--model.finetune.lora-dropout",
    "--lora-target-modules": "--model.finetune.lora-target-modules",
    "--lora-targets": "--model.finetune.lora-target-modules",  # language | vision | all | a regex
    "--vl-lr": "--train.vl-lr",
    "--lr": "--train.lr",
    "--sensor-lr": "--train.sensor-lr",
    "--mode": "--train.mode",
    "--diffusion-timesteps": "--model.head.diffusion-timesteps",
    "--sensor-loss-weight": "--train.sensor-loss-weight",
    "--sensor-enabled": "--model.sensor.enabled",
    "--no-sensor-enabled": "--model.sensor.no-enabled",
    "--fusion-strategy": "--model.fusion.strategy",
    "--epochs": "--train.epochs",
    "--batch-size": "--train.batch-size",
    "--grad-accum-steps": "--train.grad-accum-steps",
    "--grad-accum": "--train.grad-accum-steps",
    "--dataset-dir": "--data.dataset-dir",
    "--vl-model": "--model.backbone.vl-model",
    "--head": "--model.head.type",
    "--output-dir": "--train.output-dir",
    "--resume": "--train.resume",
    "--max-steps": "--train.max-steps",
    "--seed": "--train.seed",
    "--num-workers": "--data.num-workers",
}


# Keys added after configs were first saved -> what a saved config without them meant (its checkpoint's
# architecture). `from_dict` fills them where the key's section is present but the key is not.
LEGACY_VALUES = {"model.head.denoiser": "decoder"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag to change."""


@dataclass
class BackboneConfig:
    """The Qwen-VL backbone and its processor."""

    #: The VL backbone: a Hugging Face hub id or a local folder (the same code path).
    vl_model: str = DEFAULT_VL_MODEL
    #: The hub revision (branch, tag or commit) of --model.backbone.vl-model; None = the default branch.
    revision: str | None = None
    #: The backbone's weight dtype; auto: bf16 on CUDA, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: The attention implementation transformers uses in the backbone.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    #: The processor's lower bound on an image's pixel count (images are resized up to it).
    min_pixels: int = 56 * 56
    #: The processor's upper bound on an image's pixel count (images are resized down to it).
    max_pixels: int = 224 * 224
    #: Which VL tokens the head sees (every mode can be cached for stage 1). grid: each view's merged patch grid
    #: adaptive-pooled to grid_size x grid_size tokens with 2-D positions, + one instruction token (N_vl = V * k^2 + 1).
    #: all: every image token of every view with 2-D positions, + the instruction token (masked). view_mean: one
    #: masked-mean token per view + one for the instruction (N_vl = V + 1). resampler: a learned resampler with
    #: num_queries queries over all valid tokens.
    pooling: Literal["grid", "all", "view_mean", "resampler"] = "all"
    #: k of the grid pooling (k x k tokens per view).
    grid_size: int = 4
    #: The resampler pooling's number of learned queries (= VL tokens).
    num_queries: int = 8
    #: K > 0: each view's tokens (token mode all or grid) become K keypoint tokens: a spatial softmax over the view's
    #: token map (like the plain CNN's readout) gives each keypoint's expected (row, col), continuous, and its weighted
    #: feature (N_vl = V * K + 1). Trainable, after the cacheable VL pass: a cache built without it serves it. 0 = off.
    keypoints: int = 0
    #: Hidden layer the VL tokens come from: -1 = the last (after the final norm); 0 = the embeddings (the vision
    #: tower's output at image positions); i = after decoder layer i (GR00T takes a middle one). LoRA adapts only
    #: the layers before it (the ones that reach the features).
    feature_layer: int = -1
    #: The text prompt around the task instruction; `{instruction}` is replaced by it.
    prompt_template: str = "{instruction}"
    #: Recompute the backbone's decoder layers in backward instead of keeping their activations (less memory,
    #: more compute).
    activation_checkpointing: bool = False


@dataclass
class SensorConfig:
    """The high-rate sensor encoder: (B, T_s, C_s) window -> (B, N_s, D) tokens."""

    #: Use the sensor window as an input (off: a vision-only policy).
    enabled: bool = True
    #: C_s, the sensor's channels; derived from the dataset (0 = not yet known).
    channels: int = 0
    #: The leading scalar (force) channels of the dataset's sensor tensor, the rest an A-scan profile: the legacy
    #: layout, used when no declared stream reads that tensor (deprecated: declare --data.streams).
    force_channels: int = 1
    #: N_s, the sensor tokens the encoder emits.
    num_tokens: int = 4
    #: The sensor encoder's width.
    hidden_dim: int = 128
    #: The sensor encoder's transformer layers.
    num_layers: int = 2
    #: The sensor encoder's attention heads.
    num_heads: int = 4
    #: Dropout inside the sensor encoder.
    dropout: float = 0.1
    #: Channels of the 1-D convolution over the A-scan profile.
    ascan_conv_channels: int = 16


@dataclass
class FusionConfig:
    """How VL tokens, sensor tokens and robot state become the head's conditioning sequence."""

    #: How the modalities are fused: concat, cross_attention or gated.
    strategy: FusionStrategy = "concat"
    #: D, the width of the conditioning sequence.
    hidden_dim: int = 128
    #: Attention heads of the fusion (cross_attention, gated).
    num_heads: int = 4
    #: VL tokens -> D: linear (LayerNorm + Linear) or mlp (LayerNorm + Linear-GELU-Linear, LLaVA's 2-layer
    #: projector: per-token non-linear features the head can attend on, e.g. "where is the target").
    vl_projector: Literal["linear", "mlp"] = "linear"


@dataclass
class HeadConfig:
    """The action expert. Predicts a chunk (B, H, D_a)."""

    #: The action head: regression, diffusion or flow.
    type: HeadType = "regression"
    #: H, the actions per chunk; derived from the dataset (0 = not yet known).
    horizon: int = 0
    #: D_a, the action size; derived from the dataset (0 = not yet known).
    action_dim: int = 0
    #: The head's width.
    hidden_dim: int = 128
    #: The head's layers.
    num_layers: int = 2
    #: The head's attention heads.
    num_heads: int = 4
    #: Dropout inside the head.
    dropout: float = 0.0
    #: The regression head's loss (regression only).
    loss: Literal["l1", "mse"] = "l1"
    #: The diffusion head's training noise steps.
    diffusion_timesteps: int = 100
    #: Sampling steps at inference: DDIM steps (diffusion) or Euler steps (flow).
    num_inference_steps: int = 10
    #: The sampling heads' network (models/heads/denoisers.py): mlp reads the conditioning once per call into a
    #: plan, then each step is a small MLP-Mixer block; decoder cross-attends to the conditioning at every step.
    #: Configs saved before this option existed mean decoder (LEGACY_VALUES).
    denoiser: Literal["decoder", "mlp"] = "mlp"
    #: Flow sampling: the std of the initial noise (1 = the learned distribution, 0 = its mode).
    noise_scale: float = 1.0


@dataclass
class WrenchOutputConfig:
    """An optional second output: the wrench (the sensor's leading force channels, C_f) over the action horizon,
    predicted from the same conditioning as the action head and trained as an auxiliary loss (hybrid
    force-position). Old configs without this section load with it off."""

    #: Predict the wrench (the force channels) at each step of the action chunk, (H, C_f); needs a dataset with
    #: force channels. Off: no wrench head, the policy as before.
    enabled: bool = False
    #: The wrench loss's weight beside the action loss (masked L1 in normalized units, added per sample).
    weight: float = 0.1
    #: The wrench head's width.
    hidden_dim: int = 64
    #: The wrench head's attention heads.
    num_heads: int = 4


@dataclass
class FinetuneConfig:
    """What of the VL backbone trains: nothing, LoRA adapters, or everything."""

    #: What of the VL backbone trains: none, lora or full; auto: none in stage 1, lora in stage 2 (resolved by
    #: validate()).
    mode: FinetuneMode = "auto"
    #: The LoRA rank.
    lora_r: int = 16
    #: The LoRA scale numerator (the update is scaled by alpha / r).
    lora_alpha: int = 32
    #: Dropout on the LoRA branch's input (PEFT's lora_dropout).
    lora_dropout: float = 0.05
    #: A preset (language: attention projections of the language model; vision: every Linear of the vision tower
    #: incl. the merger; all: both) or a regex over module names (full match). Only modules that reach the features
    #: are adapted (language-model layers before --model.backbone.feature-layer).
    lora_target_modules: str = "language"
    #: Also train every weight of the vision tower (full fine-tuning of vision, with --train.vision-lr), on top
    #: of mode (e.g. frozen or LoRA language model + fully trained vision).
    full_vision: bool = False


@dataclass
class ModelConfig:
    """The whole `VLAPolicy`."""

    #: The Qwen-VL backbone and its processor.
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    #: The high-rate sensor encoder.
    sensor: SensorConfig = field(default_factory=SensorConfig)
    #: How VL tokens, sensor tokens and robot state become the head's conditioning sequence.
    fusion: FusionConfig = field(default_factory=FusionConfig)
    #: The action expert.
    head: HeadConfig = field(default_factory=HeadConfig)
    #: What of the VL backbone trains.
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    #: The robot state size; derived from the dataset (0 = no state input).
    state_dim: int = 0
    #: Modality dropout in training only: each view's VL tokens are masked with this probability (the
    #: learned "missing" tokens are used; fights modality neglect, trains a policy that survives a dead camera).
    #: Off at 0.
    view_dropout: float = 0.0
    #: Modality dropout in training only: the whole sensor window is masked with this probability (the
    #: learned "missing" tokens are used); 0 = off.
    sensor_dropout: float = 0.0
    #: V, the camera views; derived from the dataset (0 = not yet known).
    num_views: int = 0
    #: The optional wrench output (force over the action horizon, an auxiliary loss).
    wrench_output: WrenchOutputConfig = field(default_factory=WrenchOutputConfig)


@dataclass
class AugmentConfig:
    """Image augmentation, training only (never in PolicyRunner): random shift (pad + random crop back to
    size, DrQ-style) and mild colour jitter, per view and per sample."""

    #: Augment the training images.
    enabled: bool = False
    #: The largest shift, as a fraction of the image side.
    shift_frac: float = 0.06
    #: The brightness factor is drawn from [1 - b, 1 + b].
    brightness: float = 0.1
    #: The contrast factor is drawn from [1 - c, 1 + c].
    contrast: float = 0.1
    #: The saturation factor is drawn from [1 - s, 1 + s].
    saturation: float = 0.1


@dataclass
class DataConfig:
    """Where samples come from and how each one is assembled on the common clock."""

    #: The LeRobot v3 dataset: a folder, or a hub id `org/name[@revision]` resolved in the local hub cache.
    dataset_dir: str = ""
    #: Set by the run when dataset_dir named a hub dataset: the `org/name@<commit>` it resolved to (dataset_dir
    #: then holds the cached snapshot folder); empty for a local folder.
    dataset_hub: str = ""
    #: Extra datasets mixed in by weight, "path:weight" each; files are never duplicated. The normalization
    #: stats pool every member's training split.
    mixture: tuple[str, ...] = ()
    #: The camera views the policy sees; empty = every view in the dataset, in sorted order.
    views: tuple[str, ...] = ()
    #: The newest frame of a view must be at most this old (seconds).
    image_staleness_s: float = 0.5
    #: W: the sensor window covers (t - W, t] (seconds).
    sensor_window_s: float = 0.1
    #: T_s: uniform grid points in the sensor window.
    sensor_samples: int = 32
    #: Declared sensor streams, one `name=kind,key=value,...` each (sensorvla/streams.py), e.g. `ft=wrench,channels=0:6`
    #: (a slice of the dataset's sensor tensor) or `tactile=taxel2d,source=observation.tactile,tokens=4`. Kinds:
    #: wrench, profile1d, taxel2d, imu, generic. Empty: the dataset's sensor as force + A-scan (--model.sensor.
    #: force-channels), plus every sidecar stream the dataset declares with an encoder. Shapes come from the dataset.
    streams: tuple[str, ...] = ()
    #: H: future actions per sample.
    horizon: int = 8
    #: The seed of the episode split into train / val / test.
    split_seed: int = 0
    #: The fraction of episodes in the validation split.
    val_fraction: float = 0.15
    #: The fraction of episodes in the test split.
    test_fraction: float = 0.15
    #: Fast-slow training: VL inputs come from a frame up to k action steps older than t.
    vl_max_staleness_steps: int = 0
    #: DataLoader workers per process; -1 = auto: 0 for samples already in memory (e.g. preloaded from the VL
    #: cache), else min(2, this process's share of the physical cores) (runtime.loader_workers).
    num_workers: int = -1
    #: How state, actions and sensor are normalized: mean_std ((x - mean) / std) or quantile (maps
    #: q01..q99 to -1..1).
    normalization: Literal["mean_std", "quantile"] = "mean_std"
    #: The sensor source: sidecar stream(s) or per-frame features (e.g. observation.force); empty = automatic.
    sensor_keys: tuple[str, ...] = ()
    #: Row timestamps must sit within this of their video frame (LeRobot's tolerance_s).
    timestamp_tolerance_s: float = 1e-4
    #: A sensor transform before normalization (saved in norm_stats.json, applied by the Normalizer): after the
    #: clipping, signed_log1p(x) = sign(x) log1p(|x| / s).
    sensor_transform: Literal["none", "signed_log1p"] = "none"
    #: The channels the sensor transform applies to; force: the leading force channels.
    sensor_transform_channels: Literal["force", "all"] = "force"
    #: s of signed_log1p; 0 = per channel, the median |x| of the training split.
    sensor_log_scale: float = 0.0
    #: q: clip each sensor channel to its [q, 1 - q] training quantiles before the transform; 0 = no clipping.
    sensor_clip_quantile: float = 0.0
    #: Image augmentation (training only).
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig())


@dataclass
class TrainConfig:
    """Optimisation, stage and checkpoint policy for `sensorvla train`."""

    #: stage1 (frozen VL backbone) or stage2 (from a stage-1 checkpoint, the backbone adapted).
    stage: Stage = "stage1"
    #: The stage-1 checkpoint stage 2 starts from.
    stage1_checkpoint: str | None = None
    #: train, or cache: build the stage-1 VL feature cache.
    mode: Literal["train", "cache"] = "train"
    #: Epochs to train.
    epochs: int = 20
    #: 0 = run all epochs; >0 = exactly this many optimizer steps, over as many epochs as needed.
    max_steps: int = 0
    #: The LR schedule length in optimizer steps; 0 = what the run will do: max_steps when set, else
    #: epochs * steps/epoch.
    #: A resumed run keeps the saved run's length.
    schedule_steps: int = 0
    #: Samples per micro-batch, per process.
    batch_size: int = 4
    #: Micro-batches per optimizer step (gradient accumulation).
    grad_accum_steps: int = 8
    #: >0: the samples per optimizer step (batch x accumulation x world size), kept when the world size changes:
    #: the trainer derives --train.grad-accum-steps from it (derive_grad_accum).
    global_batch_size: int = 0
    #: The learning rate of the head + fusion.
    lr: float = 1e-4
    #: The learning rate of the sensor encoder.
    sensor_lr: float = 5e-4
    #: The learning rate of the LoRA adapters (stage 2) or the language model (full).
    vl_lr: float = 1e-5
    #: The learning rate of the vision tower (full fine-tuning or --model.finetune.full-vision).
    vision_lr: float = 5e-6
    #: AdamW weight decay (not on norms and biases).
    weight_decay: float = 0.01
    #: The fraction of the LR schedule spent in linear warmup.
    warmup_ratio: float = 0.03
    #: The cosine schedule's final LR, as a fraction of the peak.
    min_lr_ratio: float = 0.01
    #: Clip the global gradient norm to this before each optimizer step.
    grad_clip: float = 1.0
    #: The AdamW implementation: auto = fused (CPU and CUDA; foreach under FSDP2), or force one.
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    #: bf16 autocast where supported, fp32 master weights.
    mixed_precision: bool = True
    #: The loss weight of a sample with sensor data (a sample without weighs 1).
    sensor_loss_weight: float = 2.0
    #: Validate (and checkpoint the best) every this many epochs.
    val_every_epochs: int = 1
    #: Validate on at most this many samples of the val split, evenly spaced over its episodes (0 = all of it);
    #: the same subset every validation, so best-checkpoint and early-stopping decisions compare like with like.
    val_max_samples: int = 0
    #: Early stopping, in validations without improvement (0 = off).
    patience: int = 5
    #: Save checkpoints/last every this many optimizer steps; 0 = only at validation / epoch end.
    save_every_steps: int = 0
    #: The training seed (each rank seeds seed + rank).
    seed: int = 0
    #: The run's folder; checkpoints go to <output_dir>/checkpoints.
    output_dir: str = "."
    #: Resume from <output_dir>/checkpoints/last (its saved config is the default of every flag).
    resume: bool = False
    #: Where the VL feature caches live; empty = <output_dir>/vl_cache.
    cache_dir: str = ""
    #: Stage 1's VL cache: auto = use a valid cache when one exists, always = require one, never = run the
    #: backbone every step.
    use_cache: Literal["auto", "always", "never"] = "auto"
    #: The dtype of the cached VL features.
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    #: Refuse to build a VL cache larger than this on disk (GB).
    cache_max_gb: float = 50.0
    #: Stage 1 from the VL cache: hold the transformed non-image samples in memory when they fit in this
    #: many GB; 0 = never.
    preload_max_gb: float = 2.0
    #: Log the full metrics row (and a plain progress line without a bar) every this many optimizer steps.
    log_every_steps: int = 10
    #: auto: a progress bar on a terminal, plain periodic log lines otherwise; on: always a bar; off: never a
    #: bar.
    progress: Literal["auto", "on", "off"] = "auto"
    #: Multi-process training: ddp (replicated weights) or fsdp (FSDP2, sharded weights and optimizer state).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    #: Also log to Weights & Biases.
    wandb: bool = False
    #: Also log to TensorBoard (<output_dir>/tensorboard).
    tensorboard: bool = True
    #: The device to train on: auto (CUDA when available, else CPU), cpu or cuda (each process takes
    #: cuda:LOCAL_RANK).
    device: str = "auto"


@dataclass
class RuntimeConfig:
    """How the process runs the model (no effect on the results beyond float rounding)."""

    #: Compile the sensor encoder and the action head: training and CUDA inference through torch.compile
    #: (runtime.compile_policy); CPU inference exports the per-call work (torch.export + AOTInductor,
    #: inference/tick.py; its first call compiles, tens of seconds).
    compile: bool = False


@dataclass
class SensorVLAConfig:
    """Top-level config saved with every checkpoint (its config.json).

    Each layer receives its own section, not this whole config: `data` goes to data/ (the datasets, normalization),
    `model` with the sensor window of `data` (`SensorWindow.from_config`) to models/ (`build_policy`), `model` and
    `data.views` to inference/'s request checks. Only the training run, the planner, the checkpoint folder
    (`models/folder.py`), `PolicyRunner` (its checkpoint's config) and the command line hold all of it.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (what config.json holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensorVLAConfig:
        """The config of a `to_dict()` dict; every value type-checked (`ConfigError` naming the key). A key of
        `LEGACY_VALUES` missing from its section (a config saved before the key existed) gets its legacy value."""
        return section_from_dict(cls, data, "")

    def to_json(self) -> str:
        """The config as indented, key-sorted JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SensorVLAConfig:
        """The config of a JSON string (see `from_dict`)."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> SensorVLAConfig:
        """The config of a JSON file, e.g. a checkpoint's config.json."""
        return cls.from_json(Path(path).read_text())

    def validate(self) -> SensorVLAConfig:
        """Check cross-field constraints; raise `ConfigError` naming the flag to change."""
        validate(self)
        return self


# Loading is pydantic's (`TypeAdapter` over these dataclasses): strict JSON types (an int is a float, a list is a tuple;
# "8" is no int and true no number), unknown keys refused. Its errors become `ConfigError`s naming the key and the flag.
STRICT = {"strict": True, "extra": "forbid"}  # a pydantic `ConfigDict`, set on every section class when first loaded


def _sections(hint: Any) -> list[type]:
    """The dataclasses in annotation `hint`: itself, its fields' and their arguments' (tuple[X, ...], X | None)."""
    if dataclasses.is_dataclass(hint):
        found = [hint]
        for sub in typing.get_type_hints(hint).values():
            found += [c for c in _sections(sub) if c not in found]
        return found
    return [c for arg in typing.get_args(hint) for c in _sections(arg)]


@functools.cache
def _adapter(hint: Any):
    """pydantic's strict validator of annotation `hint` (a section class or a field's type)."""
    from pydantic import TypeAdapter

    for section in _sections(hint):
        section.__pydantic_config__ = STRICT
    return TypeAdapter(hint) if _sections(hint) else TypeAdapter(hint, config=STRICT)


def _as_json(value: Any) -> str:
    """`value` as JSON for the validator: numpy scalars as numbers, other unknown objects (a `Path`) as strings."""
    return json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def _with_legacy(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of `data` with each `LEGACY_VALUES` key that its section lacks (the section present) filled in."""
    data = copy.deepcopy(data)
    for key, value in LEGACY_VALUES.items():
        if not key.startswith(prefix):
            continue
        *parents, leaf = key[len(prefix) :].split(".")
        section = data
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf not in section:
            section[leaf] = value
    return data


def section_from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """The config section `cls` (any of the dataclasses above) of its `asdict()` dict, every value type-checked by
    pydantic; `prefix` ("data.") names its keys in errors (`ConfigError`, `_config_error`)."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise _section_error(prefix.rstrip("."), data)
    data = _with_legacy(data, prefix)
    try:
        return _adapter(cls).validate_json(_as_json(data))
    except ValidationError as e:
        raise _config_error(cls, data, e.errors(), prefix) from None


def _section_error(key: str, value: Any) -> ConfigError:
    return ConfigError(
        f"config section '{key or 'root'}' must be a JSON object, got {value!r} ({type(value).__name__}); "
        "fix the config file"
    )


def _config_error(cls: type, data: dict[str, Any], errors: list[dict], prefix: str) -> ConfigError:
    """The first of pydantic's `errors` as our message: unknown keys (all of that section), a section that is not an
    object, a value off its annotation (the field's whole value, its type and the flag to set)."""
    unknown = [e["loc"] for e in errors if e["type"] == "unexpected_keyword_argument"]
    loc = unknown[0] if unknown else errors[0]["loc"]
    section, hint, value, path = cls, cls, data, []
    for part in loc:  # down the sections (and lists of sections) to the field that failed
        args = typing.get_args(section)
        if isinstance(part, int) and isinstance(value, list) and args and dataclasses.is_dataclass(args[0]):
            section, value, path = args[0], value[part], [*path, str(part)]  # an entry of tuple[Section, ...]
            continue
        if not (dataclasses.is_dataclass(section) and isinstance(part, str) and isinstance(value, dict)):
            break
        if part not in {f.name for f in dataclasses.fields(section)}:
            break
        hint, value, path = typing.get_type_hints(section)[part], value.get(part), [*path, part]
        section = hint
    key = prefix + ".".join(path)
    if unknown:
        names = sorted(f.name for f in dataclasses.fields(section))
        keys = sorted(prefix + ".".join(map(str, u)) for u in unknown if list(map(str, u[:-1])) == path)
        return ConfigError(f"unknown config keys {keys}; valid keys: {names}. Remove them or fix the spelling.")
    if dataclasses.is_dataclass(hint):
        return _section_error(key.rstrip("."), value)
    return _value_error(key, value, hint)


def _flag(key: str) -> str:
    """Config key `model.head.num_inference_steps` -> flag `--model.head.num-inference-steps`."""
    *parents, leaf = key.split(".")
    return "--" + ".".join([*parents, leaf.replace("_", "-")])


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of [{', '.join(map(_type_name, args))}]"
    return getattr(hint, "__name__", str(hint))


def _value_error(key: str, value: Any, hint: Any) -> ConfigError:
    """The error of config key `key` holding `value`, off its annotation `hint`."""
    if typing.get_origin(hint) is Literal:
        return ConfigError(
            f"{_flag(key)}={value!r} is not one of {list(typing.get_args(hint))}; set {_flag(key)} to one "
            f"(config key {key})."
        )
    return ConfigError(
        f"config key {key} ({_flag(key)}) expects {_type_name(hint)}, got {value!r} ({type(value).__name__}); "
        f"fix the value in the config file or pass {_flag(key)}."
    )


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the annotation of config key `key` and converted (int -> float, list -> tuple);
    `ConfigError` naming key, type and value."""
    from pydantic import ValidationError

    try:
        return _adapter(hint).validate_json(_as_json(value))
    except ValidationError:
        raise _value_error(key, value, hint) from None


def _check_types(obj: Any, prefix: str) -> None:
    """Type-check (and normalise: int -> float, list -> tuple) every field of a config tree in place."""
    if not dataclasses.is_dataclass(obj):
        raise _section_error(prefix.rstrip("."), obj)
    _assign(obj, section_from_dict(type(obj), dataclasses.asdict(obj), prefix))


def _assign(dst: Any, src: Any) -> None:
    """Copy every field of config tree `src` into `dst`, section objects kept (callers may hold them)."""
    for f in dataclasses.fields(dst):
        mine, theirs = getattr(dst, f.name), getattr(src, f.name)
        if dataclasses.is_dataclass(mine) and type(mine) is type(theirs):
            _assign(mine, theirs)
        else:
            setattr(dst, f.name, theirs)


@dataclass(frozen=True)
class StageConfig:
    """What one training stage means: what is frozen, which LR groups exist, where weights come from, defaults.

    `validate()` applies `defaults` to every config key still set to "auto" (the same for the CLI, Python and
    a JSON config), checks `needs_stage1_checkpoint`, and the trainer reads the rest (`STAGES[cfg.train.stage]`).
    """

    name: Stage
    summary: str
    frozen: str  # what does not train by default (prose for logs and docs; `finetune.apply_finetune` acts)
    defaults: dict[str, Any]  # dotted config key -> value, applied where the config says "auto"
    recommended_modes: tuple[str, ...]  # other `--finetune-vl` modes are legal and logged as a warning:
    off_mode_warning: str  # ... this one (`{mode}`: the mode given)
    # LR groups (training/param_groups.group_of) that may exist per finetune mode; a group outside -> error
    lr_groups: dict[str, tuple[str, ...]]
    init_from: Literal["backbone", "stage1_checkpoint"]  # where the trainable weights start
    needs_stage1_checkpoint: bool
    may_use_vl_cache: bool  # stage-1 VL features can be read from the cache (frozen backbone)


_TAIL_GROUPS = ("head", "fusion", "sensor_encoder", "vl_projection")
_MODE_GROUPS = {
    "none": _TAIL_GROUPS,
    "lora": (*_TAIL_GROUPS, "vl_lora", "vision"),
    "full": (*_TAIL_GROUPS, "language", "vision"),
}
STAGES: dict[str, StageConfig] = {
    "stage1": StageConfig(
        name="stage1",
        summary="sensor encoder + action expert on a frozen VL backbone (VL features cacheable)",
        frozen="the whole VL backbone",
        defaults={"model.finetune.mode": "none"},
        recommended_modes=("none",),
        off_mode_warning="Stage 1 should use finetune-vl=none (got {mode})",
        lr_groups=_MODE_GROUPS,
        init_from="backbone",
        needs_stage1_checkpoint=False,
        may_use_vl_cache=True,
    ),
    "stage2": StageConfig(
        name="stage2",
        summary="the stage-1 weights + LoRA adapters on the VL backbone, all trained together",
        frozen="the VL backbone's base weights (LoRA adapters train)",
        defaults={"model.finetune.mode": "lora"},
        recommended_modes=("lora", "full"),
        off_mode_warning=(
            "Stage 2 with --finetune-vl {mode} (as set) trains with a frozen VL backbone; the seed guide's "
            "stage 2 uses --finetune-vl lora (the default when --finetune-vl is not given)"
        ),
        lr_groups=_MODE_GROUPS,
        init_from="stage1_checkpoint",
        needs_stage1_checkpoint=True,
        may_use_vl_cache=False,
    ),
}


def stage_config(cfg: SensorVLAConfig) -> StageConfig:
    """The `StageConfig` of `--training-stage`."""
    return STAGES[cfg.train.stage]


def set_key(cfg: Any, key: str, value: Any) -> None:
    """Set dotted config key `key` (e.g. `model.finetune.mode`) on a config tree."""
    *parents, leaf = key.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, leaf, value)


def get_key(cfg: Any, key: str) -> Any:
    """Read dotted config key `key` from a config tree."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def resolve_stage_defaults(cfg: SensorVLAConfig) -> SensorVLAConfig:
    """Apply the stage's defaults in place to every key still "auto" (`--finetune-vl auto` -> none / lora)."""
    for key, value in stage_config(cfg).defaults.items():
        if get_key(cfg, key) == "auto":
            set_key(cfg, key, value)
    return cfg


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(cfg: SensorVLAConfig, base: SensorVLAConfig | None = None) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (base value, value) for every key where `cfg` differs from `base` (default: the defaults),
    in key order. The "auto" keys of both are first resolved for `cfg`'s stage (`resolve_stage_defaults`), so
    a stage default is not reported as a change; the stage itself is when it differs."""
    ref = copy.deepcopy(base) if base is not None else SensorVLAConfig()
    cfg = copy.deepcopy(cfg)
    for key, value in stage_config(cfg).defaults.items():
        for tree in (ref, cfg):
            if get_key(tree, key) == "auto":
                set_key(tree, key, value)
    new, old = _leaves(cfg.to_dict()), _leaves(ref.to_dict())
    return {k: (old.get(k), v) for k, v in sorted(new.items()) if old.get(k) != v}


def describe_changes(changes: dict[str, tuple[Any, Any]], against: str = "the defaults") -> str:
    """`config_changes` as log lines: `--train.lr 0.001 (default 0.0001)`, one per key."""
    if not changes:
        return f"config: no value differs from {against}"
    lines = [f"config: {len(changes)} value(s) differ from {against}:"]
    lines += [f"  {_flag(k)} {json.dumps(v)} (was {json.dumps(old)})" for k, (old, v) in changes.items()]
    return "\n".join(lines)


def resolve_model(model: ModelConfig, meta: Any, *, num_views: int, horizon: int, streams: tuple = ()) -> ModelConfig:
    """The model config with its dataset-derived fields (V, D_a, H, C_s, force channels, D_st) from dataset metadata.

    `meta` has `action_dim`, `sensor_channels`, `state_dim` (and `force_channels`); `horizon` is the data's H.
    Values the user set explicitly (non-zero) must agree with the dataset; otherwise this raises with the fix.
    A dataset without a sensor stream turns the sensor input off (with a warning), unless `streams` (the resolved
    `--data.streams`) declares one.
    """
    derived = {
        ("head", "action_dim"): int(meta.action_dim),
        ("head", "horizon"): int(horizon),
        ("sensor", "channels"): int(meta.sensor_channels or 0),
        ("sensor", "force_channels"): int(getattr(meta, "force_channels", model.sensor.force_channels)),
    }
    new = dataclasses.replace(model, num_views=num_views, state_dim=int(meta.state_dim or 0))
    for (section, name), value in derived.items():
        sub = getattr(new, section)
        current = getattr(sub, name)
        if current and current != value and name != "force_channels":
            raise ValueError(
                f"--model.{section}.{name}={current} disagrees with the dataset ({value}); leave it at 0 "
                "to derive it, or use a matching dataset"
            )
        setattr(new, section, dataclasses.replace(sub, **{name: value}))
    check_wrench_output(new)
    if new.sensor.enabled and not new.sensor.channels and not streams:
        logger.warning(
            "the dataset has no sensor stream: running VISION-ONLY (sensor disabled). If it had one attached, tools "
            "that rewrite a LeRobot dataset (e.g. LeRobot's delete_episodes) drop the sidecar: re-attach it with "
            "`sensorvla data add-sensor`"
        )
        new = dataclasses.replace(new, sensor=dataclasses.replace(new.sensor, enabled=False))
    return new


def wrench_channels(model: ModelConfig) -> int:
    """C_f, the wrench output's channels: the sensor's leading force channels (0 without a sensor stream)."""
    return min(model.sensor.force_channels, model.sensor.channels) if model.sensor.channels > 0 else 0


def check_wrench_output(model: ModelConfig) -> None:
    """`ConfigError` when the wrench output is on but the dataset has no force channels to predict."""
    if model.wrench_output.enabled and not wrench_channels(model):
        raise ConfigError(
            "--model.wrench-output.enabled predicts the force channels of the sensor, but the dataset has "
            f"{'no sensor stream' if not model.sensor.channels else 'no force channels (force_channels=0)'}; "
            "use a dataset with a force sensor, or pass --model.wrench-output.no-enabled"
        )


def resolve_from_meta(cfg: SensorVLAConfig, meta: Any) -> SensorVLAConfig:
    """Fill the dataset-derived fields from dataset metadata: the views (`--data.views`, default all of the
    dataset's) and the model's shapes (`resolve_model`). Returns a new config; `cfg` is not changed."""
    views = list(cfg.data.views) or list(meta.views)
    missing = sorted(set(views) - set(meta.views))
    if missing:
        raise ValueError(f"--data.views {missing} not in the dataset (it has {list(meta.views)})")
    streams = (
        tuple(s.to_text() for s in meta.resolve_streams(cfg.data.streams)) if hasattr(meta, "resolve_streams") else ()
    )
    model = resolve_model(cfg.model, meta, num_views=len(views), horizon=cfg.data.horizon, streams=streams)
    data = dataclasses.replace(cfg.data, views=tuple(views), streams=streams or cfg.data.streams)
    return dataclasses.replace(cfg, model=model, data=data)


def stage_warnings(cfg: SensorVLAConfig) -> list[str]:
    """Legal but suspicious stage settings (the trainer logs each one)."""
    out, st, mode = [], stage_config(cfg), cfg.model.finetune.mode
    trains_backbone = any(m != "none" for m in st.recommended_modes)  # what the stage's recommended modes do
    # e.g. stage 2 with --finetune-vl none --model.finetune.full-vision trains the vision tower: no warning
    if mode != "auto" and mode not in st.recommended_modes and backbone_trains(cfg) != trains_backbone:
        out.append(st.off_mode_warning.format(mode=mode))
    if not st.needs_stage1_checkpoint and cfg.train.stage1_checkpoint:
        out.append("--stage1-checkpoint is ignored in stage 1 (it initialises stage 2)")
    return out


def backbone_trains(cfg: SensorVLAConfig) -> bool:
    """Whether any backbone weight trains (LoRA, full, or the vision tower with --model.finetune.full-vision)."""
    return cfg.model.finetune.mode in ("lora", "full") or cfg.model.finetune.full_vision


def check_stage_groups(cfg: SensorVLAConfig, groups: list[str]) -> None:
    """Raise `ConfigError` when an optimizer group exists that the stage + finetune mode does not declare."""
    allowed = set(stage_config(cfg).lr_groups[cfg.model.finetune.mode])
    if cfg.model.finetune.full_vision:
        allowed.add("vision")
    extra = sorted({g.split("/")[0] for g in groups} - allowed)
    if extra:
        raise ConfigError(
            f"{cfg.train.stage} with --finetune-vl {cfg.model.finetune.mode} trains groups {extra} that it does not "
            f"declare (allowed: {sorted(allowed)}); see config.STAGES"
        )


def derive_grad_accum(t: TrainConfig, world_size: int) -> int:
    """`--train.global-batch-size` -> the accumulation steps at this world size (`--train.grad-accum-steps`
    when it is 0); `ConfigError` naming the flags when the global batch does not divide."""
    if not t.global_batch_size:
        return t.grad_accum_steps
    per_step = t.batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"--train.global-batch-size {t.global_batch_size} is not divisible by --train.batch-size "
            f"{t.batch_size} x world size {world_size} = {per_step}; change --train.global-batch-size or "
            "--train.batch-size (or the number of processes)"
        )
    return t.global_batch_size // per_step


def _validate_data(d: DataConfig) -> None:
    """The checks of the data section alone (window, split fractions, augmentation, mixture, sensor transform)."""
    if d.sensor_window_s <= 0:
        raise ConfigError(f"--data.sensor-window-s must be > 0, got {d.sensor_window_s}")
    if not 0 <= d.val_fraction < 1 or not 0 <= d.test_fraction < 1 or d.val_fraction + d.test_fraction >= 1:
        raise ConfigError("--data.val-fraction and --data.test-fraction must be in [0, 1) and sum below 1")
    a = d.augment
    if not 0.0 <= a.shift_frac < 0.5 or min(a.brightness, a.contrast, a.saturation) < 0:
        raise ConfigError("--data.augment.shift-frac must be in [0, 0.5) and the jitter strengths >= 0")
    for spec in d.mixture:
        parse_mixture(spec)
    if not 0 <= d.sensor_clip_quantile < 0.5:
        raise ConfigError(f"--data.sensor-clip-quantile must be in [0, 0.5), got {d.sensor_clip_quantile}")
    if d.sensor_log_scale < 0 or d.timestamp_tolerance_s <= 0:
        raise ConfigError("--data.sensor-log-scale must be >= 0 and --data.timestamp-tolerance-s > 0")


def _validate_backbone(bb: BackboneConfig) -> None:
    """The backbone's pixel bounds, grid size and keypoint count."""
    if bb.min_pixels > bb.max_pixels:
        raise ConfigError("--model.backbone.min-pixels must be <= --model.backbone.max-pixels")
    if bb.grid_size <= 0:
        raise ConfigError(f"--model.backbone.grid-size must be > 0, got {bb.grid_size}")
    if bb.keypoints < 0 or (bb.keypoints and bb.pooling not in ("grid", "all")):
        raise ConfigError(
            f"--model.backbone.keypoints {bb.keypoints}: a count >= 0, with the token mode grid or all "
            f"(--model.backbone.pooling all), not {bb.pooling!r}"
        )


def validate(cfg: SensorVLAConfig) -> None:
    """Raise `ConfigError` for any invalid or inconsistent value. Normalises types and applies the stage
    defaults (`resolve_stage_defaults`) in place."""
    _check_types(cfg, "")
    resolve_stage_defaults(cfg)
    m, d, t = cfg.model, cfg.data, cfg.train
    positive = {
        "--train.batch-size": t.batch_size,
        "--train.grad-accum-steps": t.grad_accum_steps,
        "--data.horizon": d.horizon,
        "--data.sensor-samples": d.sensor_samples,
        "--model.head.diffusion-timesteps": m.head.diffusion_timesteps,
        "--model.head.num-inference-steps": m.head.num_inference_steps,
        "--model.finetune.lora-r": m.finetune.lora_r,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    for flag, value in {
        "--train.max-steps": t.max_steps,
        "--train.schedule-steps": t.schedule_steps,
        "--train.save-every-steps": t.save_every_steps,
        "--train.global-batch-size": t.global_batch_size,
        "--train.val-max-samples": t.val_max_samples,
    }.items():
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0 (0 = off / automatic), got {value}")
    if t.log_every_steps <= 0 or t.val_every_epochs <= 0:
        raise ConfigError("--train.log-every-steps and --train.val-every-epochs must be > 0")
    if d.num_workers < -1:
        raise ConfigError(f"--data.num-workers must be >= 0, or -1 for automatic, got {d.num_workers}")
    if t.epochs <= 0 and t.max_steps <= 0:
        raise ConfigError("--train.epochs must be > 0 (or set --train.max-steps)")
    if m.head.num_inference_steps > m.head.diffusion_timesteps and m.head.type == "diffusion":
        raise ConfigError(
            f"--model.head.num-inference-steps ({m.head.num_inference_steps}) cannot exceed "
            f"--diffusion_timesteps ({m.head.diffusion_timesteps})"
        )
    if not 0 <= m.head.noise_scale <= 1 or (m.head.noise_scale != 1 and m.head.type != "flow"):
        raise ConfigError(
            f"--model.head.noise-scale {m.head.noise_scale}: a value in [0, 1], for the flow head only "
            f"(this head is {m.head.type!r}); leave it at 1 otherwise"
        )
    _validate_data(d)
    _validate_backbone(m.backbone)
    if m.fusion.hidden_dim % m.fusion.num_heads or m.head.hidden_dim % m.head.num_heads:
        raise ConfigError("--model.fusion.hidden-dim / --model.head.hidden-dim must divide by their num-heads")
    for flag, p in (("--model.view-dropout", m.view_dropout), ("--model.sensor-dropout", m.sensor_dropout)):
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {p}")
    if m.view_dropout and m.backbone.pooling == "resampler":
        raise ConfigError("--model.view-dropout needs per-view tokens; use --model.backbone.pooling grid/all/view_mean")
    _validate_wrench_output(m.wrench_output)
    if m.sensor.hidden_dim % m.sensor.num_heads:
        raise ConfigError("--model.sensor.hidden-dim must be divisible by --model.sensor.num-heads")
    if m.sensor.force_channels < 0 or (m.sensor.channels and m.sensor.force_channels > m.sensor.channels):
        raise ConfigError("--model.sensor.force-channels must be between 0 and the sensor channel count")
    try:
        model_streams(cfg.data.streams, m.sensor.channels, m.sensor.force_channels)
    except StreamSpecError as e:
        raise ConfigError(f"--data.streams: {e}") from None
    if stage_config(cfg).needs_stage1_checkpoint and not t.stage1_checkpoint and not t.resume:
        raise ConfigError("Stage 2 training requires --stage1-checkpoint")
    if t.strategy == "fsdp" and not backbone_trains(cfg):
        raise ConfigError(
            "--train.strategy fsdp shards a backbone that trains (--finetune-vl lora or full); with a frozen "
            "backbone (--finetune-vl none) use --train.strategy ddp"
        )
    derive_grad_accum(t, 1)  # a global batch must at least divide by the per-process batch
    if not t.sensor_loss_weight >= 0:
        raise ConfigError("--sensor_loss_weight must be >= 0")


def _validate_wrench_output(w: WrenchOutputConfig) -> None:
    """The checks of the wrench output's section (its weight and width)."""
    if not w.weight >= 0 or w.num_heads <= 0 or w.hidden_dim <= 0 or w.hidden_dim % w.num_heads:
        raise ConfigError(
            "--model.wrench-output.weight must be >= 0 and --model.wrench-output.hidden-dim > 0, divisible by "
            "--model.wrench-output.num-heads"
        )


def parse_mixture(spec: str) -> tuple[str, float]:
    """A `--data.mixture` entry 'path/to/dataset:weight' -> (path, weight > 0); `ConfigError` otherwise."""
    path, sep, weight = spec.rpartition(":")
    try:
        w = float(weight)
    except ValueError:
        w = -1.0
    if not sep or not path or w <= 0:
        raise ConfigError(f"--data.mixture entry {spec!r} must look like 'path/to/dataset:weight' with weight > 0")
    return path, w
