"""Build a tiny random VLM offline, saved like a real hub checkpoint: Qwen2.5-VL, Qwen2-VL or Qwen3-VL, or any
other backbone family whose adapter (`models/backbones/`) has a `tiny_model` builder (`tiny_families()`).

The family's adapter gives the config and processor; for Qwen the tokenizer is a byte-level BPE trained locally
with Qwen2's pre-tokenizer, wrapped in the real `Qwen2Tokenizer` (`models/tokenizer.py`), and the processor is
the image-only subclass from `models/hf_processors.py` (no video processor, so no torchvision).
The result loads through exactly the code path of a real checkpoint.
Recipe and pitfalls: shared notes `offline-stack.md` section 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from sensorvla.models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

__all__ = ["CHAT_TEMPLATE", "FAMILIES", "SPECIAL_TOKENS", "build_tiny_qwen_vl", "tiny_families", "train_tokenizer"]

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")  # the Qwen ones (the tests of Qwen specifics run over these)


def tiny_families() -> tuple[str, ...]:
    """Every `--family` `build_tiny_qwen_vl` builds: the model types of each registered backbone family whose
    adapter has a tiny builder (models/backbones/)."""
    from sensorvla.models import backbones

    return tuple(
        t
        for a in backbones.ADAPTERS
        if type(a).tiny_model is not backbones.BackboneFamily.tiny_model
        for t in a.model_types
    )


def build_tiny_qwen_vl(
    out_dir: str | Path,
    family: str = "qwen2_5_vl",
    *,
    seed: int = 0,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    layout: Literal["v5", "hub"] = "v5",
    patch_size: int | None = None,
) -> Path:
    """Build, randomly initialise (deterministic for `seed`) and save a tiny VLM + processor of `family` (a model
    type in `tiny_families()`: the Qwen ones, idefics3, ...).

    `patch_size` defaults to the family's (14, or 16 for Qwen3-VL); a smaller one gives a finer token grid
    on small images (the demo uses 7 on 112 px views: 8 x 8 merged tokens per view).
    `layout="hub"` also writes the legacy files real checkpoints ship (`preprocessor_config.json` with
    min/max pixels, `chat_template.json`), so the loader is tested on that layout. Written atomically.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from sensorvla.io import atomic_dir
    from sensorvla.models import backbones
    from sensorvla.models.backbone import RANDOM_INIT_KEY

    if family not in tiny_families():
        raise ValueError(f"unknown family {family!r}; choose one of {tiny_families()}")
    out_dir = Path(out_dir)
    sizes = dict(text_hidden=text_hidden, text_layers=text_layers, vision_hidden=vision_hidden)
    sizes.update(vision_depth=vision_depth, patch_size=patch_size, min_pixels=min_pixels, max_pixels=max_pixels)
    cfg, proc = backbones.family_for(family).tiny_model(family, **sizes)
    setattr(cfg, RANDOM_INIT_KEY, True)  # the weights are random: training says so (backbone.randomly_initialised)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        if layout == "hub":
            if family not in FAMILIES:
                raise ValueError(f"layout='hub' writes Qwen's legacy processor files; {family!r} has none")
            patch = proc.image_processor.patch_size
            write_hub_layout(tmp, family, patch, min_pixels, max_pixels)
    return out_dir


# Processor class and image-processor settings a real hub checkpoint declares in preprocessor_config.json.
HUB_PROCESSOR_CLASS = {
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}
HUB_IMAGE_SETTINGS = {
    "merge_size": 2,
    "temporal_patch_size": 2,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


def write_hub_layout(folder: Path, family: str, patch: int, min_pixels: int, max_pixels: int) -> None:
    """Rewrite a saved processor in the legacy layout real checkpoints ship: `preprocessor_config.json` with
    min/max pixels and `chat_template.json`, without the newer `processor_config.json` / `chat_template.jinja`."""
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": HUB_PROCESSOR_CLASS[family],
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": patch,
        **HUB_IMAGE_SETTINGS,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    for name in ("processor_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
