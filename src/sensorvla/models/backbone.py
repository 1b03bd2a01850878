"""The Qwen-VL backbone: loading (model + image-only processor), prompt rendering, and `VLBackbone`,
which turns camera views + an instruction into a few VL tokens (B, N_vl, D_vl).

The same functions load a tiny offline model folder and `Qwen/Qwen2.5-VL-3B-Instruct`. Processors are
loaded through our image-only subclasses, never `AutoProcessor` (without torchvision it silently returns a
bare tokenizer, see offline-stack.md section 2).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import weakref
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from sensorvla import hub
from sensorvla.config import BackboneConfig
from sensorvla.models.hf_processors import (  # noqa: F401  (re-exported: their documented home)
    IMAGE_ONLY_PROCESSORS,
    BackboneLoadError,
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
    make_image_processor,
)

logger = logging.getLogger(__name__)


def _hint(path_or_id: str) -> str:
    return (
        f"cannot load {path_or_id!r}. Pass a local folder laid out like a hub checkpoint (config.json, "
        "*.safetensors, tokenizer and processor files) with --vl-model, or pre-download the model "
        "(huggingface-cli download) before running with HF_HUB_OFFLINE=1. For tests and demos build one "
        "with `sensorvla tiny-model --out DIR`."
    )


def _local(path_or_id: str, revision: str | None = None) -> str:
    """A hub id's snapshot folder in the local hub cache (sensorvla/hub.py), anything else unchanged; a hub id
    missing offline is a `BackboneLoadError` that says what to download and how."""
    try:
        return hub.local_path(path_or_id, revision)
    except (hub.HubCacheMissError, ValueError) as e:
        raise BackboneLoadError(_hint(path_or_id) + f" ({e})") from e


def detect_family(path_or_id: str, revision: str | None = None) -> str:
    """Model family key from config.json's model_type (qwen2_5_vl, qwen2_vl or qwen3_vl)."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(_local(path_or_id, revision), revision=revision).model_type
    except (OSError, ValueError) as e:
        raise BackboneLoadError(_hint(path_or_id) + f" ({e})") from e
    if model_type not in IMAGE_ONLY_PROCESSORS:
        raise BackboneLoadError(f"{path_or_id!r} is a {model_type!r} model; supported: {sorted(IMAGE_ONLY_PROCESSORS)}")
    return model_type


def load_processor(path_or_id: str, *, min_pixels: int, max_pixels: int, revision: str | None = None):
    """The family's image-only processor with the resolution applied at construction (min/max pixels)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from sensorvla.models import random_vl

    if random_vl.is_random(path_or_id):  # shipped config, local tokenizer (models/random_vl.py)
        return random_vl.random_processor(str(path_or_id), min_pixels=min_pixels, max_pixels=max_pixels)
    path_or_id = _local(path_or_id, revision)  # a hub id -> its cached snapshot folder (sensorvla/hub.py)
    family = detect_family(path_or_id, revision)
    size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            path_or_id, revision=revision, size=size, min_pixels=None, max_pixels=None
        )
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, revision=revision)
    except (OSError, ValueError) as e:
        raise BackboneLoadError(_hint(path_or_id) + f" ({e})") from e
    chat_template = _read_chat_template(path_or_id, revision) or getattr(tokenizer, "chat_template", None)
    if chat_template is None:
        raise BackboneLoadError(f"{path_or_id!r} has no chat template (chat_template.jinja / chat_template.json)")
    return IMAGE_ONLY_PROCESSORS[family](
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


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


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto` -> bf16 on CUDA (with support), fp32 elsewhere; otherwise the named dtype."""
    device = torch.device(device)
    if name == "auto":
        ok = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"--model.backbone.dtype {name!r} is not a torch dtype; use auto, float32, bfloat16 or float16"
        )
    return dtype


def load_vl_model(
    path_or_id: str, *, dtype: torch.dtype, attn_implementation: str = "sdpa", revision: str | None = None
):
    """The full HF model (`AutoModelForImageTextToText`), exactly as a real checkpoint is loaded.

    `random:<hub id>` builds that architecture with random weights from a shipped config (models/random_vl.py).
    """
    from transformers import AutoModelForImageTextToText

    from sensorvla.models import random_vl

    if random_vl.is_random(path_or_id):
        return random_vl.build_random_vl(str(path_or_id), dtype=dtype, attn_implementation=attn_implementation)
    try:
        return AutoModelForImageTextToText.from_pretrained(
            _local(path_or_id, revision),
            dtype=dtype,
            revision=revision,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError) as e:
        raise BackboneLoadError(_hint(path_or_id) + f" ({e})") from e


class WithoutWeights(NamedTuple):
    """A backbone's HF config standing in for the loaded model (`load_vl_model(..., weights=False)`): a policy
    built on it has every part but the HF base model, for runs whose VL features all come from the cache."""

    config: Any
    model: None = None


def load_vl_config(path_or_id: str, revision: str | None = None):
    """The backbone's HF config (config.json, or a shipped one for `random:` ids), no weights."""
    from transformers import AutoConfig

    from sensorvla.models import random_vl

    if random_vl.is_random(path_or_id):
        return random_vl.hf_config(str(path_or_id))
    try:
        return AutoConfig.from_pretrained(_local(path_or_id, revision), revision=revision)
    except (OSError, ValueError) as e:
        raise BackboneLoadError(_hint(path_or_id) + f" ({e})") from e


def build_messages(instruction: str, num_views: int, template: str = "{instruction}") -> list[dict]:
    """One user turn: V image entries, then the instruction through `template`."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_views)]
    content.append({"type": "text", "text": template.format(instruction=instruction)})
    return [{"role": "user", "content": content}]


def render_prompt(processor, instruction: str, num_views: int, template: str) -> str:
    """The chat-template prompt for an instruction and `num_views` images."""
    return processor.apply_chat_template(
        build_messages(instruction, num_views, template), tokenize=False, add_generation_prompt=False
    )


def process_sample(processor, images: list[np.ndarray], instruction: str, template: str) -> dict[str, torch.Tensor]:
    """One sample -> input_ids (1, L), attention_mask (1, L), pixel_values (patches, P), image_grid_thw (V, 3).

    Equal to `processor(text=..., images=...)`. When every view already has the size the processor would
    resize it to (the usual case: the dataset's views at the configured pixels), the image processor's own
    rescale / normalize / patchify run directly and the tokenized prompt for that (prompt, grid) is reused,
    which skips the per-call kwargs validation and tokenization (about 10x cheaper for small views)."""
    cache = _PROMPT_CACHE.setdefault(processor, {})
    prompt_key = (instruction, len(images), template)
    if prompt_key not in cache:
        cache[prompt_key] = render_prompt(processor, instruction, len(images), template)
    text = cache[prompt_key]
    fast = _fast_pixels(processor.image_processor, images) or _resized_pixels(processor.image_processor, images)
    if fast is None:
        return _full_process(processor, images, text)
    pixels, grids = fast
    key = (text, tuple(map(tuple, grids)))
    if key not in cache:
        full = _full_process(processor, images, text)
        cache[key] = {k: v for k, v in full.items() if k not in ("pixel_values", "image_grid_thw")}
    out = {k: v.clone() for k, v in cache[key].items()}
    out["pixel_values"] = torch.from_numpy(pixels)
    out["image_grid_thw"] = torch.tensor(grids, dtype=torch.int64)
    return out


# processor -> {(instruction, views, template): prompt text, (prompt text, grids): token tensors}; weak keys,
# so a processor's entries go with it (an id() key could be reused by a later processor)
_PROMPT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _full_process(processor, images: list[np.ndarray], text: str) -> dict[str, torch.Tensor]:
    from PIL import Image

    pil = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
    out = processor(text=[text], images=pil, return_tensors="pt")
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


def _patchifier(ip, needed: tuple[str, ...]):
    """(the processor's target size for an (h, w) image, its patchify kwargs) when `ip` is a Qwen-VL patchifier
    with the attributes `needed`, else None."""
    import importlib

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


RANDOM_INIT_KEY = "sensorvla_random_init"  # set in config.json by `sensorvla tiny-model` (world/tiny_qwen.py)


def randomly_initialised(vl_model: str | Path) -> bool:
    """True when the backbone's weights are random, not pretrained: `random:<hub id>`, or a folder whose
    config.json carries `sensorvla_random_init` (every `sensorvla tiny-model`)."""
    from sensorvla.models import random_vl

    if random_vl.is_random(vl_model):
        return True
    try:
        return bool(json.loads((Path(vl_model) / "config.json").read_text()).get(RANDOM_INIT_KEY))
    except (OSError, ValueError):
        return False


def random_backbone_note(cfg) -> str | None:
    """A warning for a run that freezes a randomly initialised vision tower (stage 1 without `full_vision`), else
    None: its features are a fixed random projection of the pixels, learnt from nowhere."""
    m = cfg.model
    frozen_vision = m.finetune.mode in ("none", "lora") and not m.finetune.full_vision
    if not frozen_vision or not randomly_initialised(m.backbone.vl_model):
        return None
    return (
        f"the backbone {m.backbone.vl_model} is randomly initialised, not pretrained: with the vision tower frozen "
        "its tokens are a fixed random projection of the pixels. The vision tower learns in stage 2 "
        "(--model.finetune.full-vision, the small-data-stage2 preset); to train it from stage 1 as well, pass "
        "--model.finetune.full-vision true --train.use-cache never"
    )


def token_grid(processor, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int], int] | None:
    """What the backbone sees of one (height, width) view: ((rows, cols) of merged VL tokens, the (h, w) the
    processor resizes it to, pixels per token side), or None when the processor is not a Qwen-VL patchifier."""
    setup = _patchifier(getattr(processor, "image_processor", processor), ())
    if setup is None:
        return None
    target, kw = setup
    h, w = target(height, width)
    side = kw["patch_size"] * kw["merge_size"]
    return (h // side, w // side), (h, w), side


def _rgb_uint8(im) -> np.ndarray | None:
    """`im` as a uint8 (h, w, 3) array, or None when it is not one."""
    im = np.asarray(im)
    return im if im.dtype == np.uint8 and im.ndim == 3 and im.shape[-1] == 3 else None


def _fast_pixels(ip, images: list[np.ndarray]) -> tuple[np.ndarray, list[list[int]]] | None:
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


def _resized_pixels(ip, images: list[np.ndarray]) -> tuple[np.ndarray, list[list[int]]] | None:
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


def pad_token_id(processor) -> int:
    """The tokenizer's pad id (0 when it has none)."""
    tok = processor.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else 0)


def collate_vl(items: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token tensors to (B, L); concatenate pixel_values / image_grid_thw along dim 0."""
    length = max(it["input_ids"].shape[-1] for it in items)
    out: dict[str, torch.Tensor] = {}
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
    for key, pad in pads.items():
        if key not in items[0]:
            continue
        rows = []
        for it in items:
            t = it[key].reshape(-1)
            rows.append(torch.cat([t, t.new_full((length - t.numel(),), pad)]))
        out[key] = torch.stack(rows)
    out["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
    out["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in items])
    return out


class VLFeatures(NamedTuple):
    """The cacheable output of the frozen VL pass.

    feats (B, N, D_vl) tokens; mask bool (B, N), False = padding; pos float (B, N, 3) = (view index,
    row, col) with row/col the token's centre in [0, 1] of its view's patch grid, view -1 for the
    instruction token (zeros for view_mean / resampler, whose project does not use positions).
    """

    feats: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor


def fourier_features(xy: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(..., 2) coordinates in [0, 1] -> (..., 4 * num_freqs) sin/cos features at octave frequencies."""
    freqs = math.pi * (2.0 ** torch.arange(num_freqs, device=xy.device, dtype=torch.float32))
    args = xy.float()[..., None] * freqs  # (..., 2, F)
    return torch.cat([args.sin(), args.cos()], dim=-1).flatten(-2)


class VLBackbone(nn.Module):
    """Wraps the HF Qwen-VL base model (no LM head) -> VL tokens. The constructor does no I/O.

    Token modes (`cfg.pooling`): grid (each view's merged patch grid adaptive-pooled to k x k tokens),
    all (every image token), view_mean (one token per view), resampler (learned queries); the first three
    add an instruction token (masked mean of the instruction span). `encode` is the frozen, cacheable part;
    `project` the trainable part (2-D position + view embeddings for grid/all, the resampler).

    Args:
        vl_model: a loaded `...ForConditionalGeneration`; only its `.model` (the base) is kept. A
            `WithoutWeights(config)` builds every trainable part without the base (`has_weights` False):
            `project` works on cached features, `encode` refuses.
        cfg: backbone config (token mode, grid size, feature layer, resampler queries).
        num_views: V.
    """

    POS_FREQS = 6

    def __init__(self, vl_model: nn.Module, cfg: BackboneConfig, num_views: int):
        super().__init__()
        self.cfg = cfg
        self.num_views = num_views
        self.model = vl_model.model
        conf = vl_model.config
        self.image_token_id = int(conf.image_token_id)
        self.vision_end_token_id = int(conf.vision_end_token_id)
        text_conf = getattr(conf, "text_config", conf)
        self.hidden_size = int(text_conf.hidden_size)
        self.num_layers = int(text_conf.num_hidden_layers)
        if not -self.num_layers - 1 <= cfg.feature_layer <= self.num_layers:
            raise ValueError(
                f"--model.backbone.feature-layer {cfg.feature_layer} is outside [-{self.num_layers + 1}, "
                f"{self.num_layers}] for this backbone ({self.num_layers} decoder layers)"
            )
        vision_conf = getattr(conf, "vision_config", None)
        self.merge_size = int(getattr(vision_conf, "spatial_merge_size", 2) or 2)
        eos = getattr(text_conf, "eos_token_id", None) or getattr(conf, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        # <|im_end|> ends the user turn: the instruction span stops there (robust to any padding side)
        self.register_buffer("im_end_token_ids", torch.tensor(eos, dtype=torch.long), persistent=False)
        if cfg.pooling == "resampler":
            self.queries = nn.Parameter(torch.randn(cfg.num_queries, self.hidden_size) * 0.02)
            heads = max(1, self.hidden_size // 64)
            self.resampler = nn.MultiheadAttention(self.hidden_size, heads, batch_first=True)
            self.resampler_norm = nn.LayerNorm(self.hidden_size)
        elif cfg.pooling in ("grid", "all"):
            self.token_norm = nn.LayerNorm(self.hidden_size)
            self.pos_proj = nn.Linear(4 * self.POS_FREQS, self.hidden_size)
            self.view_emb = nn.Embedding(num_views + 1, self.hidden_size)  # index V = the instruction token
            nn.init.normal_(self.view_emb.weight, std=0.02)
        elif cfg.pooling != "view_mean":
            raise ValueError(f"--model.backbone.pooling {cfg.pooling!r}: choose grid, all, view_mean or resampler")

    @property
    def num_tokens(self) -> int | None:
        """N_vl (None for "all", where it depends on the image size)."""
        mode = self.cfg.pooling
        if mode == "grid":
            return self.num_views * self.cfg.grid_size**2 + 1
        if mode == "view_mean":
            return self.num_views + 1
        if mode == "resampler":
            return self.cfg.num_queries
        return None

    @property
    def has_weights(self) -> bool:
        """Whether the HF base model is loaded (False: built for cached VL features only)."""
        return self.model is not None

    def _base_forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError(
                "this policy was built without the VL backbone's weights (a stage-1 run whose VL features all "
                "come from the cache), so it cannot encode images; build it with build_policy(cfg) (weights "
                "loaded) or pass cached `vl_features`"
            )
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        kwargs = {k: batch[k] for k in keys if k in batch}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(next(self.model.parameters()).dtype)
        layer = self.cfg.feature_layer
        if layer == -1:
            return self.model(**kwargs, use_cache=False, return_dict=True).last_hidden_state
        with self._only_layers_up_to_the_feature_layer():
            out = self.model(**kwargs, use_cache=False, return_dict=True, output_hidden_states=True)
        return out.hidden_states[layer % (self.num_layers + 1)]  # from the front: the tail may be skipped

    @contextlib.contextmanager
    def _only_layers_up_to_the_feature_layer(self):
        """Run the language model's decoder layers only up to `feature_layer` (+ 1: hidden_states[i] is layer i's
        input, and the last entry is normed) when nothing past it needs gradients: the cache build, inference and
        frozen stage 1 skip the rest (GR00T's middle layer: half the LLM; the demo's layer 0: all but one). The
        output is unchanged (tests/training/test_vl_modes.py). No layer past it trains (`finetune.past_the_features`);
        should one, it runs as before. Under FSDP2 nothing is skipped (its units all-gather in forward order)."""
        from torch.distributed.fsdp import FSDPModule

        lm = getattr(self.model, "language_model", None)
        layers = getattr(lm, "layers", None)
        keep = self.cfg.feature_layer % (self.num_layers + 1) + 1
        sharded = isinstance(self.model, FSDPModule) or any(isinstance(m, FSDPModule) for m in layers or ())
        if not isinstance(layers, nn.ModuleList) or keep >= len(layers) or sharded:
            yield
            return
        skipped = layers[keep:]
        if torch.is_grad_enabled() and any(p.requires_grad for p in skipped.parameters()):
            yield
            return
        lm.layers = layers[:keep]
        try:
            yield
        finally:
            lm.layers = layers

    def view_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token masks (B, V + 1, L): the k-th run of image pads = view k; last row = the instruction
        tokens (after the last <|vision_end|>, before the padding; role/end tokens excluded)."""
        b, length = input_ids.shape
        is_img = input_ids == self.image_token_id
        starts = is_img & ~torch.cat([is_img.new_zeros(b, 1), is_img[:, :-1]], dim=1)
        run_index = torch.cumsum(starts.long(), dim=1) - 1  # view index of each image token
        masks = torch.zeros(b, self.num_views + 1, length, dtype=torch.bool, device=input_ids.device)
        for v in range(self.num_views):
            masks[:, v] = is_img & (run_index == v)
        pos = torch.arange(length, device=input_ids.device).expand(b, length)
        last_end = torch.where(input_ids == self.vision_end_token_id, pos, -1).max(dim=1).values
        after = (pos > last_end[:, None]) & attention_mask.bool()
        if self.im_end_token_ids.numel():
            ends = torch.isin(input_ids, self.im_end_token_ids.to(input_ids.device)) & after
            stop = torch.where(ends, pos, length).min(dim=1).values
        else:  # no end-of-turn id known: the prompt ends with "<|im_end|>\n"
            stop = after.sum(dim=1) + last_end - 1
        masks[:, self.num_views] = after & (pos < stop[:, None])
        return masks

    def _instruction_token(self, hidden: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked mean over the instruction span: (B, 1, D), valid (B, 1)."""
        m = masks[:, self.num_views : self.num_views + 1].to(hidden.dtype)
        count = m.sum(-1)
        return torch.einsum("bnl,bld->bnd", m, hidden) / count.clamp_min(1)[..., None], count > 0

    def _view_grids(self, hidden: torch.Tensor, masks: torch.Tensor, grid_thw: torch.Tensor):
        """Per sample and view: the merged patch grid of hidden states (h', w', D) (frames averaged)."""
        b = hidden.shape[0]
        thw = grid_thw.reshape(b, self.num_views, 3).tolist()
        m = self.merge_size
        for i in range(b):
            for v in range(self.num_views):
                t, h, w = thw[i][v]
                tok = hidden[i, masks[i, v]]
                if tok.shape[0] != t * (h // m) * (w // m):
                    raise ValueError(
                        f"view {v} of sample {i} has {tok.shape[0]} image tokens, expected {t}x{h // m}x{w // m}; "
                        "every sample must carry exactly the dataset's views"
                    )
                yield i, v, tok.reshape(t, h // m, w // m, -1).mean(0)

    def _grid_tokens(self, hidden, masks, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
        """grid mode: (B, V * k^2, D) adaptive-pooled tokens and (B, V * k^2, 3) positions."""
        b, k, d = hidden.shape[0], self.cfg.grid_size, hidden.shape[-1]
        out = hidden.new_zeros(b, self.num_views, k, k, d)
        for i, v, grid in self._view_grids(hidden, masks, grid_thw):
            out[i, v] = nn.functional.adaptive_avg_pool2d(grid.permute(2, 0, 1), k).permute(1, 2, 0)
        return out.reshape(b, -1, d), self._grid_positions(b, hidden.device)

    def _grid_positions(self, b: int, device) -> torch.Tensor:
        """(B, V * k^2, 3) (view, row, col) of the grid tokens, view-major then row-major."""
        k = self.cfg.grid_size
        centres = (torch.arange(k, device=device, dtype=torch.float32) + 0.5) / k
        rows, cols = torch.meshgrid(centres, centres, indexing="ij")
        cell = torch.stack([rows.flatten(), cols.flatten()], dim=-1)  # (k^2, 2)
        views = torch.arange(self.num_views, device=device, dtype=torch.float32).repeat_interleave(k * k)
        return torch.cat([views[:, None], cell.repeat(self.num_views, 1)], dim=-1).expand(b, -1, -1)

    def _all_tokens(self, hidden, masks, grid_thw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """all mode: every image token, right-padded to the batch maximum: (B, N, D), mask, positions."""
        per_sample: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(hidden.shape[0])]
        for i, v, grid in self._view_grids(hidden, masks, grid_thw):
            h, w, d = grid.shape
            rows = (torch.arange(h, device=hidden.device, dtype=torch.float32) + 0.5) / h
            cols = (torch.arange(w, device=hidden.device, dtype=torch.float32) + 0.5) / w
            r, c = torch.meshgrid(rows, cols, indexing="ij")
            pos = torch.stack([torch.full_like(r, float(v)), r, c], dim=-1).reshape(-1, 3)
            per_sample[i].append((grid.reshape(-1, d), pos))
        n = max(sum(t.shape[0] for t, _ in views) for views in per_sample)
        feats = hidden.new_zeros(hidden.shape[0], n, hidden.shape[-1])
        pos = hidden.new_zeros(hidden.shape[0], n, 3, dtype=torch.float32)
        mask = torch.zeros(hidden.shape[0], n, dtype=torch.bool, device=hidden.device)
        for i, views in enumerate(per_sample):
            tok, p = torch.cat([t for t, _ in views]), torch.cat([q for _, q in views])
            feats[i, : len(tok)], pos[i, : len(tok)], mask[i, : len(tok)] = tok, p, True
        return feats, mask, pos

    def encode(self, batch: dict[str, torch.Tensor]) -> VLFeatures:
        """The frozen, cacheable part: processor batch -> VLFeatures (see its docstring for shapes)."""
        hidden = self._base_forward(batch)
        b = hidden.shape[0]
        if self.cfg.pooling == "resampler":
            mask = batch["attention_mask"].bool()
            return VLFeatures(hidden, mask, hidden.new_zeros(*mask.shape, 3, dtype=torch.float32))
        masks = self.view_masks(batch["input_ids"], batch["attention_mask"])
        if self.cfg.pooling == "view_mean":
            m = masks.to(hidden.dtype)
            counts = m.sum(-1)
            pooled = torch.einsum("bnl,bld->bnd", m, hidden) / counts.clamp_min(1)[..., None]
            return VLFeatures(pooled, counts > 0, hidden.new_zeros(b, pooled.shape[1], 3, dtype=torch.float32))
        if self.cfg.pooling == "grid":
            feats, pos = self._grid_tokens(hidden, masks, batch["image_grid_thw"])
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=hidden.device)
        else:
            feats, mask, pos = self._all_tokens(hidden, masks, batch["image_grid_thw"])
        instr, instr_ok = self._instruction_token(hidden, masks)
        instr_pos = pos.new_tensor([-1.0, 0.0, 0.0]).expand(b, 1, 3)
        return VLFeatures(
            torch.cat([feats, instr], dim=1), torch.cat([mask, instr_ok], dim=1), torch.cat([pos, instr_pos], dim=1)
        )

    def encode_frozen(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` without the positions: (feats, mask). Positions of grid mode are implied by the layout."""
        vl = self.encode(batch)
        return vl.feats, vl.mask

    def default_positions(self, feats: torch.Tensor) -> torch.Tensor:
        """The fixed layout of grid mode (B, N, 3), for callers that kept only (feats, mask)."""
        if self.cfg.pooling != "grid":
            raise ValueError(f"pooling {self.cfg.pooling!r} needs the positions returned by encode(); pass pos")
        instr = torch.tensor([[[-1.0, 0.0, 0.0]]], device=feats.device).expand(feats.shape[0], 1, 3)
        return torch.cat([self._grid_positions(feats.shape[0], feats.device), instr], dim=1)

    def token_views(self, feats: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """(B, N) long: the view of each token, V for the instruction token (not defined for resampler)."""
        if self.cfg.pooling == "view_mean":
            return torch.arange(feats.shape[1], device=feats.device).expand(feats.shape[0], -1)
        if self.cfg.pooling == "resampler":
            raise ValueError("resampler tokens mix every view; per-view masking needs grid, all or view_mean")
        pos = self.default_positions(feats) if pos is None else pos.to(feats.device)
        view = pos[..., 0].round().long()
        return torch.where(view < 0, self.num_views, view).clamp(0, self.num_views)

    def project(
        self,
        feats: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor | None = None,
        view_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable part: (B, N, D_vl) features -> VL tokens (B, N_vl, D_vl) and mask (B, N_vl).

        view_mean: identity. grid / all: LayerNorm + 2-D Fourier position + view embeddings (`pos` from
        `encode`; grid mode derives it when omitted). resampler: learned queries over the valid tokens.
        `view_keep` (B, V) bool masks every token of a dropped view (modality dropout, training only).
        """
        mode = self.cfg.pooling
        mask = mask.bool()
        if view_keep is not None:
            views = self.token_views(feats, pos)
            keep = torch.cat([view_keep.bool(), view_keep.new_ones(view_keep.shape[0], 1, dtype=torch.bool)], 1)
            mask = mask & torch.gather(keep, 1, views)
        if mode == "view_mean":
            return feats, mask
        if mode in ("grid", "all"):
            pos = self.default_positions(feats) if pos is None else pos.to(feats.device)
            view = self.token_views(feats, pos)
            is_img = (view < self.num_views).unsqueeze(-1).to(torch.float32)
            x = self.token_norm(feats.float())
            x = x + self.pos_proj(fourier_features(pos[..., 1:], self.POS_FREQS)) * is_img + self.view_emb(view)
            return x, mask
        q = self.queries.unsqueeze(0).expand(feats.shape[0], -1, -1).to(feats.dtype)
        out, _ = self.resampler(q, feats, feats, key_padding_mask=~mask.bool(), need_weights=False)
        out = self.resampler_norm(out + q)
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)

    def forward(
        self, batch: dict[str, torch.Tensor], view_keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """batch -> VL tokens (B, N_vl, D_vl) and mask (B, N_vl); uses cached `vl_features` (+ `vl_mask`,
        `vl_pos`) when present. `view_keep` (B, V): see `project`."""
        if "vl_features" in batch:
            return self.project(batch["vl_features"], batch["vl_mask"], batch.get("vl_pos"), view_keep)
        return self.project(*self.encode(batch), view_keep=view_keep)

    def enable_activation_checkpointing(self) -> None:
        """Non-reentrant gradient checkpointing on the base model (stage-2 memory); nothing without the base."""
        if self.model is None:
            return
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5 name
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
