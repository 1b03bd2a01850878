"""Backbone families: one adapter per family of Hugging Face VLMs, chosen by the model config's `model_type`.

`ADAPTERS` is the registry: adding a family is one module here (a `base.BackboneFamily` subclass) plus its line
below. Nothing here imports transformers at import time. docs/architecture.md, "Backbone families".
"""

from __future__ import annotations

from sensorvla.models.backbones.base import TOKEN_KEYS, BackboneFamily, BackboneLoadError, VLTokenIds, text_config
from sensorvla.models.backbones.idefics3 import Idefics3
from sensorvla.models.backbones.qwen import QwenVL

__all__ = [
    "ADAPTERS",
    "TOKEN_KEYS",
    "BackboneFamily",
    "BackboneLoadError",
    "UnknownFamilyError",
    "VLTokenIds",
    "family_for",
    "family_of_config",
    "family_of_processor",
    "input_keys",
    "model_types",
    "text_config",
]

# one line per family; the first is the default one (the config's defaults and `--lora-targets` presets name it)
ADAPTERS: tuple[BackboneFamily, ...] = (QwenVL(), Idefics3())


_BY_PROCESSOR_TYPE: dict[type, BackboneFamily] = {}


class UnknownFamilyError(BackboneLoadError):
    """A model whose `model_type` no adapter handles; the message lists the families and how to add one."""


def model_types() -> list[str]:
    """Every model_type some adapter handles, sorted."""
    return sorted(t for a in ADAPTERS for t in a.model_types)


def family_for(model_type: str, what: str = "this model") -> BackboneFamily:
    """The adapter for a config's `model_type`; `UnknownFamilyError` (listing the families) when none handles it."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnknownFamilyError(
        f"{what} is a {model_type!r} model; supported: {model_types()}. To add a family, write "
        "models/backbones/<family>.py (a BackboneFamily subclass: processor, token ids, view grids, layer names) "
        "and add it to ADAPTERS in models/backbones/__init__.py (docs/architecture.md, 'Backbone families')"
    )


def family_of_config(config, what: str = "this model") -> BackboneFamily:
    """The adapter for an HF config object."""
    return family_for(str(getattr(config, "model_type", None)), what)


def family_of_processor(processor) -> BackboneFamily:
    """The adapter whose processor `processor` is (`UnknownFamilyError` when none claims it)."""
    kind = type(processor)
    if kind in _BY_PROCESSOR_TYPE:  # the serving path asks every call
        return _BY_PROCESSOR_TYPE[kind]
    for adapter in ADAPTERS:
        if adapter.owns_processor(processor):
            _BY_PROCESSOR_TYPE[kind] = adapter
            return adapter
    raise UnknownFamilyError(
        f"no backbone family claims the processor {type(processor).__name__}; supported: {model_types()}. "
        "Load processors with sensorvla.models.backbone.load_processor"
    )


def input_keys() -> tuple[str, ...]:
    """Every model-input key any family's processor yields (the VL part of a sample), in a stable order."""
    keys: list[str] = []
    for adapter in ADAPTERS:
        keys += [k for k in adapter.input_keys if k not in keys]
    return tuple(keys)
