"""The backbone-family interface: what `VLBackbone`, fine-tuning, the feature cache and serving need to know of one
family of Hugging Face vision-language models (Qwen2/2.5/3-VL, Idefics3, ...), and nothing more.

Shapes (B batch, V views, L prompt tokens, D_vl the language model's width):

- `load_processor(path, min_pixels=, max_pixels=)`: the family's processor for a local folder (no torchvision,
  nothing from the hub).
- `encode_inputs(processor, images, prompt)`: one sample's model inputs, `input_ids` (1, L), `attention_mask`
  (1, L) and the family's pixel tensors (dim 0 = this sample's part, so `collate_vl` concatenates them); the keys
  are `input_keys`.
- `token_ids(config)`: `VLTokenIds`, the image placeholder id, the id that closes each image, the end-of-turn ids.
- `view_grids(config, batch, V)`: per sample and view, (frames, rows, cols) of the view's image tokens.
- `token_grid(processor, h, w)`: what one (h, w) view becomes: ((rows, cols) of tokens, the resized (h, w),
  pixels per token side).
- `model_kwargs(base, batch)`: the HF base model's forward keywords (pixels cast to its dtype); it returns
  hidden states (B, L, D_vl).
- `language_model(base)`: the decoder (`.layers` ModuleList, `.norm`), so layers past the feature layer can be
  skipped.
- `vision_prefixes`, `language_model_attr`, `lora_presets`: parameter names, i.e. what `full_vision` trains, which
  layers lie past the features and what `--lora-targets language|vision|all` adapt.
- `tiny_model(model_type, ...)`: (HF config, processor) of a tiny random model (`sensorvla tiny-model --family`).

A view's image tokens are the k-th contiguous run of `image` ids in `input_ids`; the instruction span runs from
after the last `image_end` id to the first end-of-turn id. A family whose prompt breaks either rule says so in
its `view_grids` / `token_ids`. Adding a family: one module here with a `BackboneFamily` subclass, plus its line
in `ADAPTERS` (models/backbones/__init__.py); docs/architecture.md, "Backbone families".
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

#: prompt-token keys: right-padded to the batch's longest prompt by `collate_vl` (every other key is concatenated)
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


class BackboneLoadError(OSError):
    """The backbone or its processor cannot be loaded; the message says how to fix it."""


class VLTokenIds(NamedTuple):
    """The token ids `VLBackbone` finds views and the instruction by.

    image: the placeholder each image token takes in `input_ids`; image_end: the token that closes an image (the
    instruction starts after the last one), None when the config does not name it: then the token right after
    each image's last token closes it; turn_end: ids that end the user turn (the instruction stops there; empty:
    the prompt ends with two tokens, the end-of-turn token and a newline, as in the families' chat templates).
    """

    image: int
    image_end: int | None
    turn_end: tuple[int, ...]


# processor -> {(instruction, views, template): prompt text, (prompt text, grids): token tensors}; weak keys,
# so a processor's entries go with it (an id() key could be reused by a later processor)
PROMPT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def full_process(processor, images: list[np.ndarray], text: str) -> dict[str, torch.Tensor]:
    """The processor's own call on one sample (uint8 views as PIL images): every tensor it returns."""
    from PIL import Image

    pil = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
    out = processor(text=[text], images=pil, return_tensors="pt")
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


def text_config(config) -> Any:
    """The language model's config inside a VL config (the config itself when flat)."""
    return getattr(config, "text_config", None) or config


class BackboneFamily:
    """One family of HF vision-language models behind the interface in the module docstring. Stateless: the
    registry holds one instance per family, and every method takes what it works on."""

    #: config.json `model_type` values this adapter handles (also the `sensorvla tiny-model --family` names)
    model_types: ClassVar[tuple[str, ...]] = ()
    #: model-input keys the processor yields for one sample (`TOKEN_KEYS` among them are padded on collate)
    input_keys: ClassVar[tuple[str, ...]] = ()
    #: parameter-name prefixes, inside the HF base model, of the vision tower and its projector into the LM
    vision_prefixes: ClassVar[tuple[str, ...]] = ()
    #: the HF base model's attribute holding the language model (its `.layers.<i>` and `.norm`)
    language_model_attr: ClassVar[str] = "language_model"
    #: `--lora-targets` presets (language | vision | all) -> regexes over the base model's module names
    lora_presets: ClassVar[dict[str, str]] = {}
    #: whether the memory planner (plan/) models this family's blocks
    plannable: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The family's display name (its first model_type)."""
        return self.model_types[0]

    def owns_processor(self, processor) -> bool:
        """Whether `processor` is this family's (how `process_sample` finds the family of a loaded processor)."""
        raise NotImplementedError

    def load_processor(self, path: str, *, min_pixels: int, max_pixels: int, revision: str | None = None):
        """The family's processor for a local folder, with the run's resolution applied where the family has one."""
        raise NotImplementedError

    def encode_inputs(self, processor, images: list[np.ndarray], prompt: str) -> dict[str, torch.Tensor]:
        """One sample: V uint8 (h, w, 3) views and the rendered prompt -> model inputs (see the module table)."""
        return full_process(processor, images, prompt)

    def token_grid(self, processor, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int], int] | None:
        """What one (height, width) view becomes, or None when the family cannot say without running it."""
        return None

    def min_image_side(self, processor) -> int:
        """The smallest view side (px) that still gives one whole token of content (the server's request check)."""
        return 1

    def token_ids(self, config) -> VLTokenIds:
        """The image / image-end / end-of-turn ids of a model config."""
        raise NotImplementedError

    def view_grids(self, config, batch: dict[str, torch.Tensor], num_views: int) -> list[list[tuple[int, int, int]]]:
        """Per sample and view: (frames, rows, cols) of the view's image tokens, row-major in the sequence."""
        raise NotImplementedError

    def model_kwargs(self, base: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The HF base model's forward keywords from a collated batch, pixels cast to the model's dtype."""
        kwargs = {k: batch[k] for k in self.input_keys if k in batch}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(next(base.parameters()).dtype)
        return kwargs

    def language_model(self, base: nn.Module) -> nn.Module | None:
        """The decoder inside the HF base model (None when it has none under `language_model_attr`)."""
        return getattr(base, self.language_model_attr, None)

    def tiny_model(self, model_type: str, **sizes) -> tuple[Any, Any]:
        """(HF config, processor) of a tiny random model of `model_type`; `sizes`: text_hidden, text_layers,
        vision_hidden, vision_depth, patch_size (None: the family's), min_pixels, max_pixels."""
        raise NotImplementedError(f"{self.name} has no tiny-model builder")
