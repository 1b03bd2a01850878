"""The VL backbone: loading (model + processor), prompt rendering, and `VLBackbone`, which turns camera views + an
instruction into a few VL tokens (B, N_vl, D_vl).

The same functions load a tiny offline model folder and `Qwen/Qwen2.5-VL-3B-Instruct`. What differs between
families of VLMs (processor class, pixel layout, special token ids, module names) sits behind one adapter per
family, chosen by config.json's `model_type` (`models/backbones/`: Qwen2/2.5/3-VL in `qwen.py`); this module is
family-agnostic. Processors are loaded through the adapters, never `AutoProcessor` (without torchvision it
silently returns a bare tokenizer for Qwen, see offline-stack.md section 2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from sensorvla import hub
from sensorvla.config import BackboneConfig
from sensorvla.models import backbones
from sensorvla.models.backbones import BackboneLoadError, UnknownFamilyError
from sensorvla.models.backbones.base import PROMPT_CACHE

logger = logging.getLogger(__name__)


def _hint(path_or_id: str) -> str:
    return (
        f"cannot load {path_or_id!r}. Pass a local folder laid out like a hub checkpoint (config.json, "
        "*.safetensors, tokenizer and processor files) with --vl-model, or pre-download the model "
        "(huggingface-cli download) before running with HF_HUB_OFFLINE=1. For tests and demos build one "
        "with `sensorvla tiny-model --out DIR`."
    )


@contextlib.contextmanager
def _loading(path_or_id: str):
    """Turn an OSError / ValueError of loading `path_or_id` (a missing file, a hub id not in the cache) into a
    `BackboneLoadError` that says what to pass or download; a `BackboneLoadError` passes unchanged."""
    try:
        yield
    except BackboneLoadError:
        raise
    except (OSError, ValueError) as e:  # hub.HubCacheMissError is a FileNotFoundError
        raise BackboneLoadError(_hint(path_or_id) + f" ({e})") from e


def _local(path_or_id: str, revision: str | None = None) -> str:
    """A hub id's snapshot folder in the local hub cache (sensorvla/hub.py), anything else unchanged; a hub id
    missing offline is a `BackboneLoadError` that says what to download and how."""
    with _loading(path_or_id):
        return hub.local_path(path_or_id, revision)


def detect_family(path_or_id: str, revision: str | None = None) -> str:
    """config.json's model_type (qwen2_5_vl, qwen2_vl, qwen3_vl, idefics3, ...): `UnknownFamilyError` (listing the
    families and how to add one) when no adapter in `models/backbones/` handles it."""
    from transformers import AutoConfig

    with _loading(path_or_id):
        model_type = AutoConfig.from_pretrained(_local(path_or_id, revision), revision=revision).model_type
    backbones.family_for(model_type, repr(path_or_id))
    return model_type


def load_processor(path_or_id: str, *, min_pixels: int, max_pixels: int, revision: str | None = None):
    """The family's processor (models/backbones/) with the resolution applied at construction (min/max pixels)."""
    from sensorvla.models import random_vl

    if random_vl.is_random(path_or_id):  # shipped config, local tokenizer (models/random_vl.py)
        return random_vl.random_processor(str(path_or_id), min_pixels=min_pixels, max_pixels=max_pixels)
    path_or_id = _local(path_or_id, revision)  # a hub id -> its cached snapshot folder (sensorvla/hub.py)
    family = backbones.family_for(detect_family(path_or_id, revision))
    with _loading(path_or_id):
        return family.load_processor(path_or_id, min_pixels=min_pixels, max_pixels=max_pixels, revision=revision)


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
    with _loading(path_or_id):
        return AutoModelForImageTextToText.from_pretrained(
            _local(path_or_id, revision),
            dtype=dtype,
            revision=revision,
            attn_implementation=attn_implementation,
        )


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
    with _loading(path_or_id):
        return AutoConfig.from_pretrained(_local(path_or_id, revision), revision=revision)


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
    """One sample -> input_ids (1, L), attention_mask (1, L) and the family's pixel tensors (Qwen: pixel_values
    (patches, P), image_grid_thw (V, 3)); `models/backbones/base.py` lists each family's keys.

    Equal to `processor(text=..., images=...)`. The rendered prompt is cached per (instruction, views, template);
    the family may skip the processor call's overhead (Qwen: its own patchify run directly)."""
    cache = PROMPT_CACHE.setdefault(processor, {})
    prompt_key = (instruction, len(images), template)
    if prompt_key not in cache:
        cache[prompt_key] = render_prompt(processor, instruction, len(images), template)
    return backbones.family_of_processor(processor).encode_inputs(processor, images, cache[prompt_key])


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
    """What the backbone sees of one (height, width) view: ((rows, cols) of VL tokens, the (h, w) the processor
    resizes it to, pixels per token side), or None when the processor's family cannot say."""
    try:
        family = backbones.family_of_processor(processor)
    except UnknownFamilyError:
        return None
    return family.token_grid(processor, height, width)


def pad_token_id(processor) -> int:
    """The tokenizer's pad id (0 when it has none)."""
    tok = processor.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else 0)


def collate_vl(items: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the token tensors (`backbones.TOKEN_KEYS`) to (B, L); concatenate every other key (the family's
    pixel tensors: Qwen's pixel_values / image_grid_thw, Idefics3's (1, V, ...) pixel_values and mask) on dim 0."""
    length = max(it["input_ids"].shape[-1] for it in items)
    out: dict[str, torch.Tensor] = {}
    for key in items[0]:
        if key not in backbones.TOKEN_KEYS:
            out[key] = torch.cat([it[key] for it in items])
            continue
        pad = pad_token_id if key == "input_ids" else 0
        rows = []
        for it in items:
            t = it[key].reshape(-1)
            rows.append(torch.cat([t, t.new_full((length - t.numel(),), pad)]))
        out[key] = torch.stack(rows)
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
    """Wraps the HF VL base model (no LM head) -> VL tokens. The constructor does no I/O.

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
        self.vl_config = conf
        self.family = backbones.family_of_config(conf)  # every family specific goes through it (models/backbones/)
        ids = self.family.token_ids(conf)
        self.image_token_id = ids.image
        self.vision_end_token_id = ids.image_end  # closes each image: the instruction starts after the last one
        text_conf = backbones.text_config(conf)
        self.hidden_size = int(text_conf.hidden_size)
        self.num_layers = int(text_conf.num_hidden_layers)
        if not -self.num_layers - 1 <= cfg.feature_layer <= self.num_layers:
            raise ValueError(
                f"--model.backbone.feature-layer {cfg.feature_layer} is outside [-{self.num_layers + 1}, "
                f"{self.num_layers}] for this backbone ({self.num_layers} decoder layers)"
            )
        # the end of the user turn (Qwen: <|im_end|>): the instruction span stops there (robust to any padding side)
        self.register_buffer("im_end_token_ids", torch.tensor(ids.turn_end, dtype=torch.long), persistent=False)
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
        self.keypoints = None  # --model.backbone.keypoints K: spatial-softmax keypoint tokens (models/keypoints.py)
        if cfg.keypoints:
            from sensorvla.models.keypoints import KeypointTokens

            if cfg.pooling not in ("grid", "all"):
                raise ValueError(f"--model.backbone.keypoints needs the token mode grid or all, not {cfg.pooling!r}")
            self.keypoints = KeypointTokens(self.hidden_size, num_views, cfg.keypoints)

    @property
    def num_tokens(self) -> int | None:
        """N_vl (None for "all", where it depends on the image size)."""
        mode = self.cfg.pooling
        if self.cfg.keypoints:
            return self.num_views * self.cfg.keypoints + 1
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
        kwargs = self.family.model_kwargs(self.model, batch)
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

        lm = self.family.language_model(self.model)
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
        """Token masks (B, V + 1, L): the k-th run of image tokens = view k; last row = the instruction
        tokens (after the token closing the last image, Qwen's <|vision_end|>, before the end of the turn and the
        padding; role/end tokens excluded)."""
        b, length = input_ids.shape
        is_img = input_ids == self.image_token_id
        starts = is_img & ~torch.cat([is_img.new_zeros(b, 1), is_img[:, :-1]], dim=1)
        run_index = torch.cumsum(starts.long(), dim=1) - 1  # view index of each image token
        masks = torch.zeros(b, self.num_views + 1, length, dtype=torch.bool, device=input_ids.device)
        for v in range(self.num_views):
            masks[:, v] = is_img & (run_index == v)
        pos = torch.arange(length, device=input_ids.device).expand(b, length)
        if self.vision_end_token_id is None:  # the family closes each image with the token after its last one
            last_end = torch.where(is_img, pos, -2).max(dim=1).values + 1
        else:
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

    def _view_grids(self, hidden: torch.Tensor, masks: torch.Tensor, grids: list[list[tuple[int, int, int]]]):
        """Per sample and view: the token grid of hidden states (rows, cols, D) (frames averaged); `grids` from the
        family's `view_grids`: (frames, rows, cols) of each view's image tokens."""
        for i in range(hidden.shape[0]):
            for v in range(self.num_views):
                t, h, w = grids[i][v]
                tok = hidden[i, masks[i, v]]
                if tok.shape[0] != t * h * w:
                    raise ValueError(
                        f"view {v} of sample {i} has {tok.shape[0]} image tokens, expected {t}x{h}x{w}; "
                        "every sample must carry exactly the dataset's views"
                    )
                yield i, v, tok.reshape(t, h, w, -1).mean(0)

    def _grid_tokens(self, hidden, masks, grids) -> tuple[torch.Tensor, torch.Tensor]:
        """grid mode: (B, V * k^2, D) adaptive-pooled tokens and (B, V * k^2, 3) positions."""
        b, k, d = hidden.shape[0], self.cfg.grid_size, hidden.shape[-1]
        out = hidden.new_zeros(b, self.num_views, k, k, d)
        for i, v, grid in self._view_grids(hidden, masks, grids):
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

    def _all_tokens(self, hidden, masks, grids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """all mode: every image token, right-padded to the batch maximum: (B, N, D), mask, positions."""
        per_sample: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(hidden.shape[0])]
        for i, v, grid in self._view_grids(hidden, masks, grids):
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
        grids = self.family.view_grids(self.vl_config, batch, self.num_views)
        if self.cfg.pooling == "grid":
            feats, pos = self._grid_tokens(hidden, masks, grids)
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=hidden.device)
        else:
            feats, mask, pos = self._all_tokens(hidden, masks, grids)
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
        `encode`; grid mode derives it when omitted), after `--model.backbone.keypoints` (K > 0) replaced each
        view's tokens by K spatial-softmax keypoint tokens at their expected positions (models/keypoints.py).
        resampler: learned queries over the valid tokens.
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
            if self.keypoints is not None:  # each view's tokens -> K keypoint tokens (feature, expected position)
                feats, mask, pos = self.keypoints(feats, mask, pos, view)
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
