"""What of the VL backbone trains: `none` (frozen), `lora` (PEFT adapters on named modules) or `full`.

Freezing is set by parameter name, never by class identity; the names (vision tower, language model, LoRA
presets) are the backbone family's (`models/backbones/`). LoRA adapters are injected in place into the
HF base model (`policy.backbone.model`), so module names stay those of transformers; adapter files use
PEFT's own key layout so `PeftModel.from_pretrained(AutoModelForImageTextToText..., dir)` also reads them.

Only what reaches the features trains: with `--model.backbone.feature-layer i` (not the last), the language
model's decoder layers from i on and its final norm never reach the loss, so LoRA adapts no module there and
`full` leaves them frozen (`past_the_features`). A weight that cannot get a gradient would crash DDP ("did not
receive grad") and, on one process, would silently stay at its initial value.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from sensorvla.config import FinetuneConfig
from sensorvla.models import backbones

logger = logging.getLogger(__name__)

HF_BASE_PREFIX = "backbone.model."  # the Hugging Face base model inside a VLAPolicy
ADAPTER_NAME = "default"
# PEFT saves keys relative to PeftModel(<...ForConditionalGeneration>): base_model.model.model.<...>
PEFT_KEY_PREFIX = "base_model.model.model."


class FinetuneError(ValueError):
    """The fine-tuning request cannot be applied (e.g. LoRA targets match no module)."""


def is_lora_param(name: str) -> bool:
    """True for a LoRA adapter parameter name."""
    return "lora_" in name


def lora_config(cfg: FinetuneConfig, targets: list[str] | None = None, family=None):
    """PEFT LoraConfig; `targets` = the exact module names to adapt (default: the family's preset, or the regex)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets is not None else lora_target_regex(cfg.lora_target_modules, family),
        bias="none",
    )


def lora_target_regex(targets: str, family: backbones.BackboneFamily | None = None) -> str:
    """A `--lora-targets` preset (language | vision | all) of the backbone family (default: Qwen's, which names
    `config.LORA_TARGET_PRESETS`) or a regex -> the regex."""
    presets = (family or backbones.ADAPTERS[0]).lora_presets
    return presets.get(targets, targets)


def matched_lora_targets(base: nn.Module, pattern: str, family: backbones.BackboneFamily | None = None) -> list[str]:
    """Names of `nn.Linear` modules of the HF base model whose full name matches `pattern` (or a preset)."""
    try:
        rx = re.compile(lora_target_regex(pattern, family))
    except re.error as e:
        presets = sorted((family or backbones.ADAPTERS[0]).lora_presets)
        raise FinetuneError(f"--lora-targets {pattern!r} is neither a preset {presets} nor a valid regex ({e})") from e
    return [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and rx.fullmatch(n)]


# every family's language-model attribute (Qwen: language_model, Idefics3: text_model), by name
_LM = "|".join(sorted({re.escape(a.language_model_attr) for a in backbones.ADAPTERS}))
_LM_LAYER = re.compile(rf"(?:^|\.)(?:{_LM})\.layers\.(\d+)\.")
_LM_NORM = re.compile(rf"(?:^|\.)(?:{_LM})\.norm(?:\.|$)")
# every family's vision tower (+ projector) prefixes inside the HF base model (Qwen: visual.)
VISION_PREFIXES = tuple(sorted({p for a in backbones.ADAPTERS for p in a.vision_prefixes}))


def past_the_features(name: str, feature_layer: int, num_layers: int) -> bool:
    """Whether HF base-model parameter/module `name` lies past the features taken at `feature_layer` (of
    `num_layers` decoder layers): a decoder layer at or after it, or the final norm, which only the last
    (normed) hidden state goes through. Nothing is past the features at -1 (the last hidden state)."""
    if feature_layer == -1:
        return False
    reached = feature_layer % (num_layers + 1)  # hidden_states[i] = the output of decoder layers 0..i-1
    layer = _LM_LAYER.search(name)
    if layer is not None:
        return int(layer.group(1)) >= reached
    return reached < num_layers and _LM_NORM.search(name) is not None


def _unreached(policy: nn.Module):
    """`past_the_features` for this policy's backbone (its feature layer and decoder depth), by name."""
    bb = policy.backbone
    return lambda name: past_the_features(name, bb.cfg.feature_layer, bb.num_layers)


def is_vision_param(name: str) -> bool:
    """Whether a VLAPolicy parameter name lies in the backbone's vision tower (any family's `vision_prefixes`)."""
    return name.startswith(HF_BASE_PREFIX) and is_vision_base_param(name[len(HF_BASE_PREFIX) :])


def is_vision_base_param(name: str) -> bool:
    """Whether an HF base-model parameter name lies in the vision tower or its projector."""
    return name.startswith(VISION_PREFIXES)


def apply_finetune(policy: nn.Module, cfg: FinetuneConfig) -> None:
    """Freeze / unfreeze the backbone and inject LoRA in place, according to `cfg.mode`.

    Everything outside the HF base model (sensor encoder, fusion, head, VL resampler) stays trainable.
    Raises `FinetuneError` when LoRA targets match zero modules.
    """
    base = policy.backbone.model
    if base is None:  # built for cached VL features: nothing of the backbone to freeze or adapt
        if cfg.mode != "none" or cfg.full_vision:
            raise FinetuneError(
                f"--finetune-vl {cfg.mode} (full_vision={cfg.full_vision}) trains the VL backbone, but this policy "
                "was built without its weights (VL features from the cache); build it with the weights"
            )
        return
    unreached = _unreached(policy)
    for n, p in base.named_parameters():
        p.requires_grad_(cfg.mode == "full" and not unreached(n))
    if cfg.full_vision:
        if not any(is_vision_base_param(n) for n, _ in base.named_parameters()):
            raise FinetuneError(f"--model.finetune.full-vision: this backbone has no vision tower {VISION_PREFIXES}")
        for n, p in base.named_parameters():
            if is_vision_base_param(n):
                p.requires_grad_(True)
    if cfg.mode == "lora":
        if any(is_lora_param(n) for n, _ in base.named_parameters()):
            raise FinetuneError("LoRA adapters are already injected into this backbone")
        family = policy.backbone.family
        matched = matched_lora_targets(base, cfg.lora_target_modules, family)
        if not matched:
            raise FinetuneError(
                f"--lora-targets {cfg.lora_target_modules!r} matches no Linear module of the backbone. "
                f"Use a preset {sorted(family.lora_presets)} or a regex over full module names such as "
                f"'{family.language_model_attr}.layers.0.self_attn.q_proj' (the language model) or a name under "
                f"{family.vision_prefixes} (the vision tower)."
            )
        targets = [n for n in matched if not unreached(n)]
        layer = policy.backbone.cfg.feature_layer
        if not targets:
            raise FinetuneError(
                f"--lora-targets {cfg.lora_target_modules!r} matches only language-model layers past "
                f"--model.backbone.feature-layer {layer}, which never reach the features (LoRA there would get no "
                "gradient). Use --lora-targets vision or all, a later --model.backbone.feature-layer (-1 = the "
                "last), or train the vision tower alone with --finetune-vl none --model.finetune.full-vision."
            )
        if len(targets) < len(matched):
            logger.info(
                "LoRA: %d of the %d matched modules lie past --model.backbone.feature-layer %d and are not adapted",
                len(matched) - len(targets),
                len(matched),
                layer,
            )
        from peft import inject_adapter_in_model

        # the exact Linear names: PEFT never touches a module the preset/regex did not intend
        inject_adapter_in_model(lora_config(cfg, targets), base, adapter_name=ADAPTER_NAME)
        for n, p in base.named_parameters():
            p.requires_grad_(is_lora_param(n) or (cfg.full_vision and is_vision_base_param(n)))
        logger.info("LoRA r=%d alpha=%d on %d modules", cfg.lora_r, cfg.lora_alpha, len(targets))


def adapter_state_dict(policy: nn.Module, state: dict | None = None) -> dict:
    """LoRA tensors in PEFT's on-disk key layout; `state`: a full (gathered, FSDP2) policy state dict to read."""
    from peft import get_peft_model_state_dict

    base_sd = (
        None
        if state is None
        else {k[len(HF_BASE_PREFIX) :]: v for k, v in state.items() if k.startswith(HF_BASE_PREFIX)}
    )
    sd = get_peft_model_state_dict(policy.backbone.model, state_dict=base_sd, adapter_name=ADAPTER_NAME)
    return {PEFT_KEY_PREFIX + k: v.detach().contiguous() for k, v in sd.items()}


def load_adapter_state_dict(policy: nn.Module, sd: dict) -> None:
    """Load LoRA tensors saved by `adapter_state_dict`; raises listing missing/unexpected keys."""
    from peft import set_peft_model_state_dict

    stripped = {}
    for k, v in sd.items():
        if not k.startswith(PEFT_KEY_PREFIX):
            raise FinetuneError(f"adapter key {k!r} does not start with {PEFT_KEY_PREFIX!r}; not a sensorvla adapter")
        stripped[k[len(PEFT_KEY_PREFIX) :]] = v
    expected = set(adapter_state_dict(policy))
    got = {PEFT_KEY_PREFIX + k for k in stripped}
    if expected != got:
        raise FinetuneError(
            "adapter mismatch: missing="
            f"{sorted(expected - got)[:10]} unexpected={sorted(got - expected)[:10]}. "
            "The adapter was trained with other --lora-r / --lora-target-modules or another backbone."
        )
    set_peft_model_state_dict(policy.backbone.model, stripped, adapter_name=ADAPTER_NAME)


def merge_lora(policy: nn.Module) -> int:
    """Merge LoRA weights into the base linear layers in place (inference). Returns modules merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for m in policy.backbone.model.modules():
        if isinstance(m, BaseTunerLayer) and not m.merged:
            m.merge()
            count += 1
    return count
