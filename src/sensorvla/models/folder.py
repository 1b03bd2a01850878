"""The `pretrained_model/` folder format: write it, verify it, read its config and load its tensors.

Folder layout (LeRobot-like):
    config.json                 the full SensorVLAConfig
    model.safetensors           every trainable and non-backbone tensor (the frozen HF base is referenced
                                by `model.backbone.vl_model`, not copied; `full` fine-tuning stores it too)
    adapter_model.safetensors   LoRA tensors, PEFT key layout (LoRA only)
    adapter_config.json         PEFT LoraConfig (LoRA only)
    norm_stats.json             normalization statistics with their fingerprint
    manifest.json               sha256 of EVERY file above (sensorvla.integrity), checked at load
Loading is strict: a changed file (sha256), an empty or partial manifest, a bad config value, invalid norm
stats (non-finite, std <= 0, not numbers, lengths other than the model's dims), or a missing or unexpected
key raises `CheckpointMismatchError` naming the file and the fix.
`sensorvla export` (`export_folder`) writes the same folder for LeRobot too: config.json gains LeRobot's policy keys
(`"type": "sensorvla"`, `input_features`, `output_features`, and the plugin's `fps`, `sensor_keys`), which
`read_config` sets aside, and policy_preprocessor.json / policy_postprocessor.json hold LeRobot's (identity)
processor pipelines; the manifest lists them too. Both `sensorvla serve` and LeRobot's `--policy.path` load it
(plugins/lerobot_policy_sensorvla).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sensorvla import integrity
from sensorvla.config import ConfigError, ModelConfig, SensorVLAConfig
from sensorvla.io import atomic_dir, save_safetensors
from sensorvla.models import finetune

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
NORM_STATS_NAME = "norm_stats.json"
LEROBOT_TYPE = "sensorvla"  # the policy type the LeRobot plugin registers (plugins/lerobot_policy_sensorvla)
# LeRobot's own PreTrainedConfig keys, and the plugin's (lerobot_policy_sensorvla's SensorVLAConfig: the dataset's
# fps and sensor keys, run-time options), that an exported config.json may carry beside ours
LEROBOT_KEYS = frozenset(
    {"type", "n_obs_steps", "input_features", "output_features", "device", "use_amp", "use_peft", "push_to_hub"}
    | {"repo_id", "private", "tags", "license", "pretrained_path"}
    | {"fps", "sensor_keys", "n_action_steps", "vl_model_override"}
)
PREPROCESSOR_NAME = "policy_preprocessor.json"
POSTPROCESSOR_NAME = "policy_postprocessor.json"


class CheckpointMismatchError(RuntimeError):
    """Saved tensors do not match the model built from the saved config."""


def saved_state_dict(policy: torch.nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors that go to model.safetensors: everything but the frozen HF base and LoRA tensors (a vision
    tower trained with --model.finetune.full-vision is saved)."""
    full, vision = policy.cfg.finetune.mode == "full", policy.cfg.finetune.full_vision
    out = {}
    for k, v in (policy.state_dict() if state is None else state).items():
        if finetune.is_lora_param(k):
            continue
        if k.startswith(finetune.HF_BASE_PREFIX) and not full and not (vision and finetune.is_vision_param(k)):
            continue
        out[k] = v
    return out


def save_pretrained(
    policy, out_dir: str | Path, cfg: SensorVLAConfig, norm_stats=None, state: dict | None = None
) -> Path:
    """Write the pretrained_model folder atomically (see module docstring).

    Args:
        state: a full (gathered) state dict to save instead of `policy.state_dict()` (FSDP2 training).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_NAME).write_text(cfg.to_json())
        save_safetensors(saved_state_dict(policy, state), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        if cfg.model.finetune.mode == "lora":
            save_safetensors(
                finetune.adapter_state_dict(policy, state), tmp / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"}
            )
            lcfg = finetune.lora_config(cfg.model.finetune).to_dict()
            lcfg["base_model_name_or_path"] = cfg.model.backbone.vl_model
            lcfg["target_modules"] = finetune.lora_target_regex(
                cfg.model.finetune.lora_target_modules, policy.backbone.family
            )
            lcfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lcfg.items()}
            (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(lcfg, indent=2, default=str))
        if norm_stats is not None:
            norm_stats.save(tmp / NORM_STATS_NAME)
        integrity.write_manifest(tmp)  # every file: weights, config, adapter config, norm stats
    return out_dir


def verify_folder(path: str | Path) -> None:
    """Check every file of a pretrained_model folder against its manifest; raise naming the file and the fix."""
    path = Path(path)
    if not integrity.has_manifest(path):
        logger.warning(
            "%s has no %s (deleted, or saved by an older sensorvla): NONE of its files (weights, config, norm "
            "stats) is integrity-checked. After checking they are the files you saved, add one: `%s`",
            path,
            integrity.MANIFEST_NAME,
            integrity.rewrite_command(path),
        )
        return
    problems = integrity.verify_manifest(path)
    if problems:
        raise CheckpointMismatchError("; ".join(problems))


def load_state_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    """Load `sd` into `module`; raise CheckpointMismatchError unless its keys are exactly `expected`."""
    got = set(sd)
    if got != expected:
        raise CheckpointMismatchError(
            f"{what}: checkpoint loading mismatch. missing={sorted(expected - got)[:20]} "
            f"unexpected={sorted(got - expected)[:20]}. The checkpoint was saved from a different config "
            "(head, fusion, sensor, finetune mode or dataset shapes); load it with its own config.json."
        )
    own = module.state_dict()
    bad = [k for k in got if own[k].shape != sd[k].shape]
    if bad:
        raise CheckpointMismatchError(
            f"{what}: shape mismatch for {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in bad[:10]]}"
        )
    result = module.load_state_dict(sd, strict=False)  # strictness enforced above, on the saved subset
    leftover = set(result.unexpected_keys)
    if leftover:
        raise CheckpointMismatchError(f"{what}: unexpected keys {sorted(leftover)[:20]}")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; CheckpointMismatchError naming the file when it is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointMismatchError(f"{path} is missing; the folder is not a complete pretrained_model")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointMismatchError(f"{path} is corrupt or not a safetensors file ({e}); re-export it") from e


def read_config(path: str | Path) -> SensorVLAConfig:
    """The validated config.json of a pretrained_model folder, after its weights' manifest check."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a sensorvla pretrained_model folder")
    try:
        cfg = SensorVLAConfig.from_dict(sensorvla_part(json.loads(cfg_path.read_text())))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"{cfg_path} is not a valid sensorvla config: {e}") from e
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointMismatchError(f"{cfg_path} is not a valid sensorvla config: {e}") from e
    verify_folder(path)
    return cfg


def load_weights(policy: torch.nn.Module, path: str | Path, model: ModelConfig):
    """Load a folder's tensors (and LoRA adapters) into a policy built from its model config; its NormStats or None."""
    path = Path(path)
    from sensorvla.models.sensors.encoder import upgrade_state_dict

    sd = upgrade_state_dict(read_safetensors(path / WEIGHTS_NAME))  # saved before declared streams: today's keys
    load_state_strict(policy, sd, set(saved_state_dict(policy)), str(path / WEIGHTS_NAME))
    if model.finetune.mode == "lora":
        finetune.load_adapter_state_dict(policy, read_safetensors(path / ADAPTER_WEIGHTS_NAME))
    if not (path / NORM_STATS_NAME).exists():
        return None
    return read_norm_stats(path / NORM_STATS_NAME, model)


def stats_dims(model: ModelConfig) -> dict[str, int]:
    """The channel count the model expects of each normalized key."""
    dims = {"actions": model.head.action_dim, "state": model.state_dim}
    if model.sensor.enabled:
        dims["sensor"] = model.sensor.channels
    return dims


def read_norm_stats(path: Path, model: ModelConfig):
    """A folder's NormStats, validated (numbers, finite, std >= 0, lengths equal to the model's dims);
    CheckpointMismatchError naming the file and the fix otherwise."""
    from sensorvla.data.normalize import NormalizationError, NormStats

    try:
        stats = NormStats.load(path)
        stats.check_dims(stats_dims(model), path)
    except NormalizationError as e:
        raise CheckpointMismatchError(str(e)) from e
    return stats


def sensorvla_part(data: dict) -> dict:
    """A config.json dict without the LeRobot policy keys of an exported folder (`"type": "sensorvla"` marks one)."""
    if isinstance(data, dict) and data.get("type") == LEROBOT_TYPE:
        return {k: v for k, v in data.items() if k not in LEROBOT_KEYS}
    return data


def lerobot_image_key(view: str) -> str:
    """A view's LeRobot observation key: `observation.images.<view>` (a view read from a key outside that prefix,
    e.g. `observation.image`, is its key)."""
    return view if view.startswith("observation.") else f"observation.images.{view}"


def lerobot_features(cfg: SensorVLAConfig, image_shapes: dict[str, tuple[int, int, int]]) -> dict[str, dict]:
    """LeRobot's `input_features` / `output_features` of a checkpoint: one VISUAL feature per view
    (`observation.images.<view>`, (3, h, w) from `image_shapes` by view), STATE, and the ACTION vector."""
    m = cfg.model
    inputs = {lerobot_image_key(v): {"type": "VISUAL", "shape": list(image_shapes[v])} for v in cfg.data.views}
    if m.state_dim:
        inputs["observation.state"] = {"type": "STATE", "shape": [m.state_dim]}
    return {"input_features": inputs, "output_features": {"action": {"type": "ACTION", "shape": [m.head.action_dim]}}}


def _pipeline(name: str, steps: list[dict]) -> dict:
    """A LeRobot `PolicyProcessorPipeline` config (processor/pipeline.py `_save_pretrained` layout)."""
    return {"name": name, "steps": steps}


def lerobot_processors(device: str = "cpu") -> dict[str, dict]:
    """LeRobot's pre/post processor files of an exported folder: identity pipelines (renaming and device moves only).
    Normalization, image resizing and tokenization stay in sensorvla's own transform chain (PolicyRunner), so that
    LeRobot and `sensorvla serve` run one implementation."""
    rename = {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}}
    to_device = {"registry_name": "device_processor", "config": {"device": device, "float_dtype": None}}
    return {
        PREPROCESSOR_NAME: _pipeline("policy_preprocessor", [rename, to_device]),
        POSTPROCESSOR_NAME: _pipeline("policy_postprocessor", [to_device]),
    }


def export_folder(
    src: str | Path,
    dst: str | Path,
    *,
    image_shapes: dict[str, tuple[int, int, int]] | None = None,
    vl_model: str | None = None,
    vl_revision: str | None = None,
) -> Path:
    """Copy a verified pretrained_model folder to `dst` in the layout both `sensorvla serve` and LeRobot load.

    Args:
        image_shapes: (3, h, w) of each view as the robot's cameras give them (LeRobot's VISUAL features; the async
            server resizes camera frames to them). None: the dataset's, read from `data.dataset_dir` when it exists.
        vl_model / vl_revision: the backbone reference to record instead of the trained one (e.g. a hub id and its
            commit for another machine, `org/name` + 40-hex commit).

    Raises:
        CheckpointMismatchError / FileNotFoundError: `src` is not an intact pretrained_model folder.
        ValueError: the image shapes are unknown (give `image_shapes`).
    """
    import shutil

    src, dst = Path(src), Path(dst)
    cfg = read_config(src)  # config checks + the weights' manifest
    if vl_model is not None:
        cfg.model.backbone.vl_model, cfg.model.backbone.revision = vl_model, vl_revision
    meta = _dataset_meta(cfg)
    shapes = image_shapes or ({v: (3, c.shape[0], c.shape[1]) for v, c in meta.cameras.items()} if meta else {})
    missing = [v for v in cfg.data.views if v not in shapes]
    if missing:
        raise ValueError(
            f"the image shape of view(s) {missing} is unknown: the training dataset {cfg.data.dataset_dir!r} is not "
            "here; pass each camera's shape (`sensorvla export --image-shape VIEW=HxW`)"
        )
    data = {**cfg.to_dict(), "type": LEROBOT_TYPE, **lerobot_features(cfg, shapes)}
    if meta is not None:  # the plugin's sensor clock: per-frame sensor features are sampled at the dataset's fps
        data.update(fps=meta.action_fps, sensor_keys=list(meta.sensor_keys))
    else:
        data.update(sensor_keys=list(cfg.data.sensor_keys))
    with atomic_dir(dst) as tmp:
        names = [WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, NORM_STATS_NAME]
        names = [n for n in names if (src / n).exists()]
        for n in names:
            shutil.copyfile(src / n, tmp / n)
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True))
        for n, pipeline in lerobot_processors().items():
            (tmp / n).write_text(json.dumps(pipeline, indent=2))
        integrity.write_manifest(tmp)  # every file
    return dst


def _dataset_meta(cfg: SensorVLAConfig):
    """The training dataset's `DatasetMeta` when its folder is here (None otherwise)."""
    root = Path(cfg.data.dataset_dir) if cfg.data.dataset_dir else None
    if root is None or not (root / "meta" / "info.json").exists():
        return None
    from sensorvla.data.format import load_meta

    return load_meta(root, sensor_keys=cfg.data.sensor_keys or None)
