"""The Idefics3 family (SmolVLM's architecture: a SigLIP vision tower, a pixel-shuffle connector, a Llama decoder).

Processor: transformers' `Idefics3Processor` over the PIL image processor, which needs no torchvision, with image
splitting off: each view is resized to one S x S image (S = `max_image_size`, the vision tower's `image_size`),
so `pixel_values` is (1, V, 3, S, S) with `pixel_attention_mask` (1, V, S, S) per sample, and each view becomes
one run of (S / patch / scale)^2 `<image>` tokens, a row-major grid, between `<fake_token_around_image>` tokens.
The pixel bounds (--model.backbone.min-pixels / max-pixels) cannot move the resolution, which is the model's: a
view of S x S px outside them is logged as a warning naming the fix (docs/decisions.md). The config names only the
image token id: the token after each run closes it (`VLTokenIds.image_end` None), and the user turn ends with
`<end_of_utterance>` and a newline (the chat template's two closing tokens).
Base model layout: `vision_model.` and `connector.` (the vision side), `text_model.layers.<i>`, `text_model.norm`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sensorvla.models.backbones.base import BackboneFamily, VLTokenIds

# SmolVLM's chat template, shortened: "<|im_start|>User:<image>...<image>{text}<end_of_utterance>\n"
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
_LM_ATTN = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj)"
logger = logging.getLogger(__name__)


class Idefics3(BackboneFamily):
    """Idefics3 (model type idefics3)."""

    model_types = ("idefics3",)
    input_keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    vision_prefixes = ("vision_model.", "connector.")
    language_model_attr = "text_model"
    lora_presets = {
        "language": _LM_ATTN,
        "vision": r"(?:vision_model|connector)\..*",
        "all": rf"(?:{_LM_ATTN})|(?:(?:vision_model|connector)\..*)",
    }

    def owns_processor(self, processor) -> bool:
        """An `Idefics3Processor`."""
        from transformers import Idefics3Processor

        return isinstance(processor, Idefics3Processor)

    def load_processor(self, path: str, *, min_pixels: int, max_pixels: int, revision: str | None = None):
        """The folder's processor with image splitting off (one S x S image per view). The pixel bounds cannot
        change S: a warning names the fix when S x S lies outside them."""
        from transformers import Idefics3Processor

        processor = Idefics3Processor.from_pretrained(path, revision=revision)
        processor.image_processor.do_image_splitting = False
        side = int(processor.image_processor.max_image_size["longest_edge"])
        if not min_pixels <= side * side <= max_pixels:
            logger.warning(
                "%s is an Idefics3 backbone: every view is resized to its vision tower's %dx%d px (%d pixels), "
                "outside --model.backbone.min-pixels %d / --model.backbone.max-pixels %d, which this family cannot "
                "honour. Set both to %d to silence this, or choose a checkpoint of another image size",
                path, side, side, side * side, min_pixels, max_pixels, side * side,
            )  # fmt: skip
        return processor

    def token_grid(self, processor, height: int, width: int):
        """Every view: resized to S x S, (S / patch / scale)^2 tokens."""
        side = int(processor.image_processor.max_image_size["longest_edge"])
        n = round(int(processor.image_seq_len) ** 0.5)
        return (n, n), (side, side), side // n

    def token_ids(self, config) -> VLTokenIds:
        """`<image>` from the config; the token after each run closes it. The config does not name
        `<end_of_utterance>` (a real checkpoint's eos is another token), so no turn-end id: the prompt ends with
        `<end_of_utterance>` and a newline, as the chat template writes it."""
        return VLTokenIds(int(config.image_token_id), None, ())

    def view_grids(self, config, batch: dict[str, torch.Tensor], num_views: int) -> list[list[tuple[int, int, int]]]:
        """(1, S / patch / scale, S / patch / scale) for every view of every sample (pixel_values (B, V, 3, S, S))."""
        vision = config.vision_config
        side = int(batch["pixel_values"].shape[-1]) // int(vision.patch_size) // int(config.scale_factor)
        return [[(1, side, side)] * num_views for _ in range(batch["input_ids"].shape[0])]

    def tiny_model(self, model_type: str, **sizes) -> tuple[Any, Any]:
        """A tiny Idefics3 (Llama text model) with a locally trained tokenizer; views S x S, S the largest multiple
        of patch x 2 within sqrt(max_pixels) (224 px, patch 14: 8 x 8 tokens per view)."""
        from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast

        from sensorvla.models.tokenizer import train_bpe

        tok = PreTrainedTokenizerFast(
            tokenizer_object=train_bpe(),
            bos_token="<|im_start|>",
            eos_token="<end_of_utterance>",
            pad_token="<|endoftext|>",
            extra_special_tokens=SPECIAL_TOKENS,
        )
        patch, scale = sizes.get("patch_size") or 14, 2
        side = max(1, int(sizes["max_pixels"] ** 0.5) // (patch * scale)) * patch * scale
        hidden = sizes["text_hidden"]
        text = dict(model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden)
        text.update(num_hidden_layers=sizes["text_layers"], num_attention_heads=4, num_key_value_heads=2)
        text.update(vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id)
        text.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        width = sizes["vision_hidden"]
        vision = dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4)
        vision.update(num_hidden_layers=sizes["vision_depth"], image_size=side, patch_size=patch)
        ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
        config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=scale, **ids)
        ip = Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side}
        )
        seq = (side // patch // scale) ** 2
        return config, Idefics3Processor(
            image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=CHAT_TEMPLATE
        )
