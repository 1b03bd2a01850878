"""`VLAPolicy`: VL backbone + sensor encoder + fusion + action head, behind two seams.

`forward(batch) -> (loss, metrics)` for training and `predict_chunk(batch) -> (B, H, D_a)` for inference
(normalized action space). Freezing / LoRA live in `models/finetune.py`; the folder format in `models/folder.py`.
`build_policy` and `load_pretrained` assemble one from a config or a pretrained_model folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from sensorvla.config import (
    ConfigError,
    ModelConfig,
    SensorVLAConfig,
    check_wrench_output,
    resolve_stage_defaults,
    wrench_channels,
)
from sensorvla.data.timeline import SensorWindow
from sensorvla.models import finetune, folder
from sensorvla.models.backbone import VLBackbone
from sensorvla.models.fusion import build_fusion
from sensorvla.models.heads import build_head
from sensorvla.models.heads.wrench import build_wrench_head, wrench_target
from sensorvla.models.sensors.encoder import SensorEncoder
from sensorvla.streams import model_streams


class VLAPolicy(nn.Module):
    """A sensor-augmented VLA policy. The constructor builds modules only (no I/O, no device moves).

    Args:
        cfg: the model config; `sensor.channels`, `head.horizon`, `head.action_dim`, `num_views` and
            `state_dim` must already be resolved from the dataset (see `config.resolve_model`).
        vl_model: a loaded Hugging Face Qwen-VL model (`models/backbone.load_vl_model`).
        sensor_window: the sensor window (T_s grid points), `SensorWindow.from_config(data)` of the run.
    """

    def __init__(self, cfg: ModelConfig, vl_model: nn.Module, sensor_window: SensorWindow):
        super().__init__()
        for name, value in {
            "model.head.horizon": cfg.head.horizon,
            "model.head.action_dim": cfg.head.action_dim,
            "model.num_views": cfg.num_views,
        }.items():
            if value <= 0:
                raise ValueError(
                    f"{name} is unresolved ({value}); build the policy with build_policy(), "
                    "which reads it from the dataset metadata"
                )
        self.cfg = cfg
        self.sensor_window = sensor_window
        self.sensor_samples = sensor_window.samples
        self.backbone = VLBackbone(vl_model, cfg.backbone, cfg.num_views)
        streams = model_streams(sensor_window.streams, cfg.sensor.channels, cfg.sensor.force_channels)
        if cfg.sensor.enabled:
            if not streams:
                raise ValueError(
                    "model.sensor.channels is unresolved and no stream is declared; the dataset declares no sensor. "
                    "Pass --no-sensor-enabled for a vision-only policy."
                )
            self.sensor_encoder = SensorEncoder(cfg.sensor, streams, sensor_window)
            sensor_dim = self.sensor_encoder.out_dim
        else:
            self.sensor_encoder = None
            sensor_dim = None
        self.fusion = build_fusion(cfg.fusion, self.backbone.hidden_size, sensor_dim, cfg.state_dim)
        self.head = build_head(cfg.head, self.fusion.out_dim)
        check_wrench_output(cfg)  # built last: without it, every other module initialises as before
        self.wrench_head = build_wrench_head(
            cfg.wrench_output, self.fusion.out_dim, cfg.head.horizon, wrench_channels(cfg)
        )

    # --- shared path -------------------------------------------------------------------------------
    def modality_keep(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Training-only modality dropout draws: (view_keep (B, V) bool | None, sensor_keep (B,) bool | None),
        each view kept with p = 1 - view_dropout, the sensor with p = 1 - sensor_dropout; (None, None) in
        eval mode or when both are 0. Draws use the global torch RNG (checkpointed, so resume is exact)."""
        cfg = self.cfg
        if not self.training or not (cfg.view_dropout or cfg.sensor_dropout):
            return None, None
        b = batch["sensor"].shape[0]
        device = batch["sensor"].device
        view_keep = torch.rand(b, cfg.num_views, device=device) >= cfg.view_dropout if cfg.view_dropout else None
        sensor_keep = torch.rand(b, device=device) >= cfg.sensor_dropout if cfg.sensor_dropout else None
        return view_keep, sensor_keep

    def condition(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch -> conditioning sequence (B, N_c, D) and its mask (B, N_c)."""
        view_keep, sensor_keep = self.modality_keep(batch)
        vl, vl_mask = self.backbone(batch, view_keep=view_keep)
        vl = vl.float()
        sensor_tok = sensor_tok_mask = None
        if self.sensor_encoder is not None:
            sensor_tok, sensor_tok_mask = self.sensor_encoder(batch, sensor_keep)
        state = batch.get("state") if self.cfg.state_dim > 0 else None
        return self.fusion(vl, vl_mask, sensor_tok, sensor_tok_mask, None if state is None else state.float())

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        sensor_loss_weight: float = 1.0,
        weight_sum: float | None = None,
        generator: torch.Generator | None = None,
    ):
        """Training seam.

        Args:
            batch: model batch (docs/interfaces.md section 3) with `actions` (B, H, D_a) and
                `action_mask` (B, H).
            sensor_loss_weight: weight of samples that carry sensor data (the seed's `--sensor_loss_weight`).
            weight_sum: the normaliser of the weighted loss sum. None = this batch's own weight sum (a
                weighted mean). The trainer passes the accumulation window's total weight over all ranks,
                so the w:1 ratio holds across micro-batches (an all-sensor micro-batch included).
            generator: draws the head's loss noise (validation passes its own); None = the global RNG.

        Returns:
            (loss, metrics): the weighted loss (scalar) and per-subset diagnostics: `loss_sensor`
            and `loss_no_sensor` (means of the action loss over samples with / without sensor data, NaN-free:
            absent subsets are omitted) and their sample counts. With the wrench output, each sample's loss is its
            action loss + `wrench_output.weight` x its wrench loss, and `loss_wrench` (the wrench loss's mean over
            samples with a measured target step) and `n_wrench` are added.
        """
        cond, cond_mask = self.condition(batch)
        per_sample = self.head.loss(
            cond, cond_mask, batch["actions"].float(), batch["action_mask"].bool(), generator=generator
        )
        has_sensor = batch["has_sensor"].bool()
        weights = torch.where(has_sensor, sensor_loss_weight, 1.0).to(per_sample.dtype)
        norm = weights.sum().clamp_min(1e-8) if weight_sum is None else max(float(weight_sum), 1e-8)
        metrics: dict[str, float] = {"loss_unweighted": float(per_sample.detach().mean())}
        with torch.no_grad():
            for name, sel in (("sensor", has_sensor), ("no_sensor", ~has_sensor)):
                n = int(sel.sum())
                metrics[f"n_{name}"] = float(n)
                if n:
                    metrics[f"loss_{name}"] = float(per_sample[sel].mean())
        if self.wrench_head is not None:
            per_sample = per_sample + self.cfg.wrench_output.weight * self._wrench_loss(batch, cond, cond_mask, metrics)
        return (per_sample * weights).sum() / norm, metrics

    def _wrench_loss(self, batch, cond: torch.Tensor, cond_mask: torch.Tensor, metrics: dict) -> torch.Tensor:
        """The wrench head's per-sample loss (B,); its mean over samples with a target into `metrics`."""
        target = wrench_target(batch)
        if target is None:
            raise ValueError(
                "this policy has the wrench output (--model.wrench-output.enabled) but the batch has no "
                "'wrench_target': build batches from a dataset with force channels (EpisodeDataset adds it)"
            )
        per_sample = self.wrench_head.loss(cond, cond_mask, *target)
        with torch.no_grad():
            has = target[1].any(1)
            metrics["n_wrench"] = float(has.sum())
            if has.any():
                metrics["loss_wrench"] = float(per_sample[has].mean())
        return per_sample

    @torch.inference_mode()
    def predict_chunk(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Inference seam: batch without actions -> normalized action chunk (B, H, D_a)."""
        cond, cond_mask = self.condition(batch)
        return self.head.sample(cond, cond_mask, generator=generator)

    @torch.inference_mode()
    def predict(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        """Every output of one conditioning: `actions` (B, H, D_a) as `predict_chunk` (the same noise draws) and,
        with the wrench output, `wrench` (B, H, C_f); both normalized."""
        cond, cond_mask = self.condition(batch)
        out = {"actions": self.head.sample(cond, cond_mask, generator=generator)}
        if self.wrench_head is not None:
            out["wrench"] = self.wrench_head(cond, cond_mask)
        return out

    # --- files (thin wrappers over models/folder.py) ---------------------------------------------
    def save_pretrained(self, out_dir, config, norm_stats=None):
        """Write the pretrained_model folder: config.json, model.safetensors, adapters, norm_stats.json.

        Args:
            config: the full SensorVLAConfig (saved as JSON; `load_pretrained` rebuilds from it).
        """
        return folder.save_pretrained(self, out_dir, config, norm_stats)


PolicyConfig = ModelConfig | SensorVLAConfig  # what `build_policy` takes: a model config (with a window), or all


def policy_inputs(cfg: PolicyConfig, sensor_window: SensorWindow | None = None) -> tuple[ModelConfig, SensorWindow]:
    """What a policy is built from: the model config and the run's sensor window.

    A `ModelConfig` comes with its `sensor_window`; a whole `SensorVLAConfig` (the documented short form) gives its
    model and `SensorWindow.from_config(cfg.data)`, with its stage's fine-tuning default applied to a copy when the
    config skipped `validate()`.
    """
    if not isinstance(cfg, SensorVLAConfig):
        if sensor_window is None:
            raise TypeError("a ModelConfig comes with the run's window: (model, SensorWindow.from_config(data))")
        return cfg, sensor_window
    if cfg.model.finetune.mode == "auto":
        model = dataclasses.replace(cfg.model, finetune=dataclasses.replace(cfg.model.finetune))
        cfg = resolve_stage_defaults(dataclasses.replace(cfg, model=model))
    return cfg.model, sensor_window or SensorWindow.from_config(cfg.data)


def build_policy(
    cfg: PolicyConfig,
    sensor_window: SensorWindow | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    vl_weights: bool = True,
) -> VLAPolicy:
    """Load the VL backbone named in the model config and assemble a `VLAPolicy` with fine-tuning applied.

    Args:
        cfg: the resolved model config (`config.resolve_model`), or a whole `SensorVLAConfig` (`policy_inputs`).
        sensor_window: the run's sensor window (T_s grid points), `SensorWindow.from_config(data)`.
        vl_weights: False builds on the backbone's HF config only (`backbone.WithoutWeights`), for a frozen stage 1
            whose VL features all come from the cache: the same trained parts and checkpoints, and a 3B's 7 GiB of
            weights are never loaded.
    """
    from sensorvla.models.backbone import WithoutWeights, load_vl_config, load_vl_model, resolve_dtype

    model, window = policy_inputs(cfg, sensor_window)
    if model.finetune.mode == "auto":
        raise ConfigError(
            "model.finetune.mode is 'auto': the training stage decides it; resolve it first "
            "(SensorVLAConfig.validate()) or pass the whole config"
        )
    device = torch.device(device)
    bcfg = model.backbone
    vl_dtype = dtype or resolve_dtype(bcfg.dtype, device)
    if vl_weights:
        vl = load_vl_model(
            bcfg.vl_model, dtype=vl_dtype, attn_implementation=bcfg.attn_implementation, revision=bcfg.revision
        )
    else:
        vl = WithoutWeights(load_vl_config(bcfg.vl_model, bcfg.revision))
    policy = VLAPolicy(model, vl, window)
    finetune.apply_finetune(policy, model.finetune)
    if bcfg.activation_checkpointing:
        policy.backbone.enable_activation_checkpointing()
    return policy.to(device)


def load_pretrained(path: str | Path, *, device: str | torch.device = "cpu", vl_model: str | None = None):
    """Load (policy, cfg, norm_stats) from a pretrained_model folder, strictly (`models/folder.py`).

    Args:
        vl_model: override the backbone location recorded in config.json (e.g. the folder moved).
    """
    cfg = folder.read_config(path)
    if vl_model is not None:
        bb = cfg.model.backbone
        if vl_model != bb.vl_model:  # another backbone location; `org/name@rev` carries its own revision
            bb.revision = None
        bb.vl_model = vl_model
    policy = build_policy(cfg, device="cpu")
    norm_stats = folder.load_weights(policy, path, cfg.model)
    return policy.to(device), cfg, norm_stats
