"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL family: every Qwen specific of the backbone lives here.

Processor: the image-only subclasses (`models/hf_processors.py`, no video processor so no torchvision) over the
PIL image processor, with `min_pixels` / `max_pixels` applied at load. A view is resized by `smart_resize` to a
multiple of patch x merge px, patchified into `pixel_values` (patches, C * T * p * p) with `image_grid_thw` (V, 3)
= (frames, rows, cols) of patches; its tokens are one run of `<|image_pad|>` (rows x cols / merge^2 of them),
closed by `<|vision_end|>`; the user turn ends with `<|im_end|>`. The fast paths below give the processor's
output through its own patchify without the call's overhead (tests/models/test_processor_fast.py).
Base model layout: `visual.` (vision tower + merger), `language_model.layers.<i>`, `language_model.norm`.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorvla.config import LORA_TARGET_PRESETS
from sensorvla.models.backbones.base import (
    PROMPT_CACHE,
    BackboneFamily,
    BackboneLoadError,
    VLTokenIds,
    full_process,
    text_config,
)


class QwenVL(BackboneFamily):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL (model types qwen2_vl, qwen2_5_vl, qwen3_vl)."""

    model_types = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
    input_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    vision_prefixes = ("visual.",)
    language_model_attr = "language_model"
    lora_presets = LORA_TARGET_PRESETS
    plannable = True

    def owns_processor(self, processor) -> bool:
        """The image-only Qwen processors (and the stock ones, for callers that built their own)."""
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

        return isinstance(processor, (Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor))

    def load_processor(self, path: str, *, min_pixels: int, max_pixels: int, revision: str | None = None):
        """The image-only processor of the folder's model type, resolution applied at construction."""
        from transformers import AutoConfig, AutoTokenizer, Qwen2VLImageProcessorPil

        from sensorvla.models.hf_processors import IMAGE_ONLY_PROCESSORS

        model_type = AutoConfig.from_pretrained(path, revision=revision).model_type
        size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            path, revision=revision, size=size, min_pixels=None, max_pixels=None
        )
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        chat_template = _read_chat_template(path, revision) or getattr(tokenizer, "chat_template", None)
        if chat_template is None:
            raise BackboneLoadError(f"{path!r} has no chat template (chat_template.jinja / chat_template.json)")
        return IMAGE_ONLY_PROCESSORS[model_type](
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
        )

    def encode_inputs(self, processor, images: list[np.ndarray], prompt: str) -> dict[str, torch.Tensor]:
        """The processor's output; its own patchify run directly when no view needs the full call (see
        `fast_pixels`), the tokens of a (prompt, grids) pair reused (about 10x cheaper for small views)."""
        ip = processor.image_processor
        fast = fast_pixels(ip, images) or resized_pixels(ip, images)
        if fast is None:
            return full_process(processor, images, prompt)
        pixels, grids = fast
        cache = PROMPT_CACHE.setdefault(processor, {})
        key = (prompt, tuple(map(tuple, grids)))
        if key not in cache:
            full = full_process(processor, images, prompt)
            cache[key] = {k: v for k, v in full.items() if k not in ("pixel_values", "image_grid_thw")}
        out = {k: v.clone() for k, v in cache[key].items()}
        out["pixel_values"] = torch.from_numpy(pixels)
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.int64)
        return out

    def token_grid(self, processor, height: int, width: int):
        """((rows, cols) of merged tokens, the smart-resized (h, w), patch x merge px) of one view."""
        setup = _patchifier(getattr(processor, "image_processor", processor), ())
        if setup is None:
            return None
        target, kw = setup
        h, w = target(height, width)
        side = kw["patch_size"] * kw["merge_size"]
        return (h // side, w // side), (h, w), side

    def min_image_side(self, processor) -> int:
        """patch x merge px: a smaller view has less than one VL token of content."""
        ip = processor.image_processor
        return int(ip.patch_size) * int(getattr(ip, "merge_size", 1))

    def token_ids(self, config) -> VLTokenIds:
        """<|image_pad|>, <|vision_end|>, and the text config's eos ids (<|im_end|> ends the user turn)."""
        text = text_config(config)
        eos = getattr(text, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return VLTokenIds(int(config.image_token_id), int(config.vision_end_token_id), tuple(int(e) for e in eos))

    def view_grids(self, config, batch: dict[str, torch.Tensor], num_views: int) -> list[list[tuple[int, int, int]]]:
        """`image_grid_thw` (B * V, 3) of patches -> (frames, rows / merge, cols / merge) of tokens."""
        merge = int(getattr(getattr(config, "vision_config", None), "spatial_merge_size", 2) or 2)
        thw = batch["image_grid_thw"].reshape(-1, num_views, 3).tolist()
        return [[(t, h // merge, w // merge) for t, h, w in sample] for sample in thw]

    def tiny_model(self, model_type: str, **sizes) -> tuple[Any, Any]:
        """A tiny random Qwen-VL's config and image-only processor (offline-stack.md section 2)."""
        from sensorvla.models.hf_processors import IMAGE_ONLY_PROCESSORS, make_image_processor
        from sensorvla.models.tokenizer import CHAT_TEMPLATE, train_tokenizer

        tok = train_tokenizer()
        patch = sizes.get("patch_size") or (16 if model_type == "qwen3_vl" else 14)
        cfg = _tiny_config(model_type, tok, patch=patch, **{k: sizes[k] for k in _TINY_SIZES})
        ip = make_image_processor(patch, sizes["min_pixels"], sizes["max_pixels"])
        proc = IMAGE_ONLY_PROCESSORS[model_type](image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE)
        return cfg, proc


_TINY_SIZES = ("text_hidden", "text_layers", "vision_hidden", "vision_depth")


def _tiny_config(
    family: str, tok, *, text_hidden: int, text_layers: int, vision_hidden: int, vision_depth: int, patch: int
):
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
    text["head_dim"] = head_dim
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = dict(wide, num_position_embeddings=256, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def _read_chat_template(path_or_id: str, revision: str | None = None) -> str | None:
    p = Path(path_or_id)
    if (p / "chat_template.jinja").exists():
        return (p / "chat_template.jinja").read_text()
    if (p / "chat_template.json").exists():
        return json.loads((p / "chat_template.json").read_text())["chat_template"]
    if not p.exists():
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(path_or_id, "chat_template.json", revision=revision)
            return json.loads(Path(path).read_text())["chat_template"]
        except Exception:  # the tokenizer may carry it instead
            return None
    return None


def _patchifier(ip, needed: tuple[str, ...]):
    """(the processor's target size for an (h, w) image, its patchify kwargs) when `ip` is a Qwen-VL patchifier
    with the attributes `needed`, else None."""
    smart_resize = getattr(importlib.import_module(type(ip).__module__), "smart_resize", None)
    base = ("patchify", "patch_size", "merge_size", "temporal_patch_size", "size")
    if smart_resize is None or not all(hasattr(ip, a) for a in base + needed):
        return None
    factor = ip.patch_size * ip.merge_size

    def target(h: int, w: int) -> tuple[int, int]:
        if not ip.do_resize:
            return h, w
        return smart_resize(h, w, factor=factor, min_pixels=ip.size.shortest_edge, max_pixels=ip.size.longest_edge)

    return target, dict(patch_size=ip.patch_size, merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size)


def _rgb_uint8(im) -> np.ndarray | None:
    """`im` as a uint8 (h, w, 3) array, or None when it is not one."""
    im = np.asarray(im)
    return im if im.dtype == np.uint8 and im.ndim == 3 and im.shape[-1] == 3 else None


def fast_pixels(ip, images: list[np.ndarray]) -> tuple[np.ndarray, list[list[int]]] | None:
    """The image processor's output through its own patchify, or None where its resize would change an image
    (or the processor is not a Qwen-VL patchifier): the caller then runs it fully.

    The uint8 image is patchified as is, then rescaled and normalized in one per-column affine map
    (x * rescale / std - mean / std, the column's channel learnt once per image size): equal to the
    processor's rescale -> normalize -> patchify within 1e-6 (float rounding), at a third of its cost."""
    setup = _patchifier(ip, ("image_mean", "image_std"))
    if setup is None or not (ip.do_rescale and ip.do_normalize):
        return None
    target, kw = setup
    patches, grids = [], []
    for im in images:
        im = _rgb_uint8(im)
        if im is None or target(*im.shape[:2]) != im.shape[:2]:
            return None
        h, w = im.shape[:2]
        scale, shift = _column_affine(
            ip, h, w, float(ip.rescale_factor), tuple(np.ravel(ip.image_mean)), tuple(np.ravel(ip.image_std))
        )
        flat, gh, gw = ip.patchify(im.transpose(2, 0, 1), **kw)  # (patches, C * T * p * p) float32 of 0..255
        flat = np.require(flat, np.float32, ["C", "W", "O"])  # a private buffer to work in place
        flat *= scale
        flat += shift
        patches.append(flat)
        grids.append([1, gh, gw])
    return np.concatenate(patches), grids


def resized_pixels(ip, images: list[np.ndarray]) -> tuple[np.ndarray, list[list[int]]] | None:
    """The image processor's output for views it resizes, through its own steps without the call's overhead: PIL
    resize of the uint8 image to `smart_resize`'s size with the processor's resample filter (what its resize does
    with a uint8 image), then its own rescale, normalize and patchify. Bit-equal to the full call (a camera's
    640 x 480 frames at the default pixel bounds, say), at a quarter of its cost; None where the processor is not
    a Qwen-VL patchifier, and the caller runs it fully."""
    from PIL import Image

    setup = _patchifier(ip, ("rescale", "normalize", "resample"))
    if setup is None:
        return None
    target, kw = setup
    patches, grids = [], []
    for im in images:
        im = _rgb_uint8(im)
        if im is None:
            return None
        h, w = target(*im.shape[:2])
        x = np.asarray(Image.fromarray(im).resize((w, h), resample=ip.resample)).transpose(2, 0, 1)
        if ip.do_rescale:
            x = ip.rescale(x, ip.rescale_factor)
        if ip.do_normalize:
            x = ip.normalize(x, ip.image_mean, ip.image_std)
        flat, gh, gw = ip.patchify(x, **kw)
        patches.append(flat)
        grids.append([1, gh, gw])
    return np.concatenate(patches), grids


@functools.lru_cache(maxsize=32)
def _column_affine(ip, h: int, w: int, rescale: float, mean: tuple, std: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per patch column: (rescale / std, -mean / std) of its channel, for (h, w) images (patchify an index
    image once to learn each column's channel); keyed by the processor and its settings."""
    kw = dict(patch_size=ip.patch_size, merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size)
    channel = np.broadcast_to(np.arange(3, dtype=np.float32)[:, None, None], (3, h, w))
    flat, _, _ = ip.patchify(channel, **kw)
    col = np.asarray(flat[0], dtype=np.int64)  # the channel of each column (the same in every patch row)
    mean_a, std_a = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scale = (rescale / std_a)[col].astype(np.float32)
    shift = (-mean_a / std_a)[col].astype(np.float32)
    return scale, shift
