"""Build a tiny random Qwen-VL (Qwen2.5-VL, Qwen2-VL or Qwen3-VL) offline, saved like a real hub checkpoint.

The tokenizer is a byte-level BPE trained locally with Qwen2's pre-tokenizer, wrapped in the real
`Qwen2Tokenizer` (`models/tokenizer.py`); the processor is the image-only subclass from
`models/hf_processors.py` (no video processor, so no torchvision).
The result loads through exactly the code path of a real checkpoint.
Recipe and pitfalls: shared notes `offline-stack.md` section 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from sensorvla.models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

__all__ = ["CHAT_TEMPLATE", "FAMILIES", "SPECIAL_TOKENS", "build_tiny_qwen_vl", "train_tokenizer"]

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")


def _config(family: str, tok, *, text_hidden: int, text_layers: int, vision_hidden: int, vision_depth: int, patch: int):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    heads = 4
    head_dim = text_hidden // heads
    ids = {
        k: tok.convert_tokens_to_ids(t)
        for k, t in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }
    half = head_dim // 2  # mrope_section must sum to head_dim / 2 (checked only at forward time by HF)
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = dict(
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        bos_token_id=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
    )
    common = dict(depth=vision_depth, num_heads=4, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
    # Qwen2.5-VL and Qwen3-VL name the vision width hidden_size and project to out_hidden_size; Qwen2-VL calls
    # the width embed_dim and the projection hidden_size
    wide = dict(common, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=text_hidden)
    if family == "qwen2_5_vl":
        vision = dict(wide, window_size=112, fullatt_block_indexes=[vision_depth - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if family == "qwen2_vl":
        vision = dict(common, embed_dim=vision_hidden, mlp_ratio=2, hidden_size=text_hidden)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if family == "qwen3_vl":
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(wide, num_position_embeddings=256, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


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
    """Build, randomly initialise (deterministic for `seed`) and save a tiny Qwen-VL + processor.

    `patch_size` defaults to the family's (14, or 16 for Qwen3-VL); a smaller one gives a finer token grid
    on small images (the demo uses 7 on 112 px views: 8 x 8 merged tokens per view).
    `layout="hub"` also writes the legacy files real checkpoints ship (`preprocessor_config.json` with
    min/max pixels, `chat_template.json`), so the loader is tested on that layout. Written atomically.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from sensorvla.io import atomic_dir
    from sensorvla.models.backbone import RANDOM_INIT_KEY
    from sensorvla.models.hf_processors import IMAGE_ONLY_PROCESSORS, make_image_processor

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    out_dir = Path(out_dir)
    tok = train_tokenizer()
    patch = patch_size or (16 if family == "qwen3_vl" else 14)
    cfg = _config(
        family,
        tok,
        text_hidden=text_hidden,
        text_layers=text_layers,
        vision_hidden=vision_hidden,
        vision_depth=vision_depth,
        patch=patch,
    )
    setattr(cfg, RANDOM_INIT_KEY, True)  # the weights are random: training says so (backbone.randomly_initialised)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg)
    proc = IMAGE_ONLY_PROCESSORS[family](
        image_processor=make_image_processor(patch, min_pixels, max_pixels), tokenizer=tok, chat_template=CHAT_TEMPLATE
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        if layout == "hub":
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
