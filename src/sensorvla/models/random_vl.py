"""Real-size Qwen-VL architectures with random weights, built from configs shipped in the package.

`--vl-model random:Qwen/Qwen2.5-VL-3B-Instruct` (also Qwen2.5-VL-7B, Qwen2-VL-2B/7B, Qwen3-VL-2B/4B/8B) gives
the published architecture, deterministic random weights and a processor with the real image settings
(patch size, merge size, min/max pixels) plus a locally trained tokenizer whose special-token ids are the
real ones (151643...), so the published config works unchanged. Nothing is downloaded: this measures the
real model's memory and latency on a machine without hub access. The configs live in `models/archs/`,
one JSON per model with its source (`_source`) and published parameter count; see the README there.
`load_vl_model` / `load_processor` in `models/backbone.py` route `random:` ids here.
"""

from __future__ import annotations

import copy
import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

RANDOM_PREFIX = "random:"
ARCHS_DIR = Path(__file__).with_name("archs")
REAL_FIRST_SPECIAL_ID = 151643  # <|endoftext|> in every Qwen2 / Qwen2.5 / Qwen3 tokenizer


def is_random(path_or_id: str | Path) -> bool:
    """True for `random:<hub id>` backbone names."""
    return str(path_or_id).startswith(RANDOM_PREFIX)


def hub_id(path_or_id: str) -> str:
    """`random:Qwen/X` -> `Qwen/X`."""
    return str(path_or_id)[len(RANDOM_PREFIX) :] if is_random(path_or_id) else str(path_or_id)


def available() -> list[str]:
    """Hub ids with a shipped config, e.g. `Qwen/Qwen2.5-VL-3B-Instruct`."""
    return sorted(p.stem.replace("--", "/", 1) for p in ARCHS_DIR.glob("*--*.json"))


def has_arch(path_or_id: str) -> bool:
    """Whether a config for this hub id (with or without the `random:` prefix) is shipped."""
    return (ARCHS_DIR / (hub_id(path_or_id).replace("/", "--", 1) + ".json")).exists()


@lru_cache(maxsize=16)
def _read_arch(name: str) -> dict[str, Any]:
    return json.loads((ARCHS_DIR / (name.replace("/", "--", 1) + ".json")).read_text())


def load_arch(path_or_id: str) -> dict[str, Any]:
    """The shipped record: `config` (config.json as published), `preprocessor_config`, `published_num_parameters`
    and `_source`. Raises BackboneLoadError naming the available models."""
    from sensorvla.models.backbones.base import BackboneLoadError

    name = hub_id(path_or_id)
    if not has_arch(name):
        choices = ", ".join(RANDOM_PREFIX + a for a in available())
        raise BackboneLoadError(
            f"--vl-model {path_or_id!r}: no shipped architecture for {name!r}. Choose one of: {choices} "
            f"(configs live in {ARCHS_DIR})"
        )
    return copy.deepcopy(_read_arch(name))


def hf_config(path_or_id: str):
    """The transformers config object of a shipped architecture (no weights, no files)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = load_arch(path_or_id)["config"]
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


BANK_SIZE = 1_000_003  # prime: weight rows of any width never line up with the bank's period


def build_random_vl(path_or_id: str, *, dtype: torch.dtype, attn_implementation: str = "sdpa", seed: int = 0):
    """The full HF model (`AutoModelForImageTextToText`) with deterministic random weights, built directly in
    `dtype` (never an fp32 copy first) on the ambient default device: `with torch.device("meta"):` gives a
    weightless model for counting and planning, `with torch.device("cuda"):` builds it on the GPU.

    Weights come from `fill_random` rather than transformers' per-tensor `normal_` init, which takes about 80 s
    for a 3B model on one CPU thread; the fill is a few memory copies per tensor and equally deterministic.
    """
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    cfg = hf_config(path_or_id)
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # skipped with the init; tied checkpoints (tie_word_embeddings) share embedding and head
    fill_random(model, seed=seed, std=float(getattr(cfg, "initializer_range", 0.02)))
    return model


@torch.no_grad()
def fill_random(model: torch.nn.Module, *, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic weights: normalization weights 1, biases 0, everything else N(0, std) values copied from a
    seeded bank of BANK_SIZE draws, starting at a per-tensor offset. A no-op on the meta device."""
    if all(p.device.type == "meta" for p in model.parameters()):
        return
    bank = torch.randn(BANK_SIZE, generator=torch.Generator().manual_seed(seed)) * std
    banks: dict[tuple, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if p.device.type == "meta":
                continue
            if name == "bias":
                p.zero_()
            elif is_norm:
                p.fill_(1.0)
            else:
                key = (p.device, p.dtype)
                if key not in banks:
                    banks[key] = bank.to(device=p.device, dtype=p.dtype)
                _tile_into(p.view(-1), banks[key], zlib.crc32(f"{mod_name}.{name}".encode()) % BANK_SIZE)


def _tile_into(flat: torch.Tensor, bank: torch.Tensor, offset: int) -> None:
    pos, n = 0, flat.numel()
    while pos < n:
        take = min(bank.numel() - offset, n - pos)
        flat[pos : pos + take].copy_(bank[offset : offset + take])
        pos, offset = pos + take, 0


def random_processor(path_or_id: str, *, min_pixels: int, max_pixels: int):
    """The family's image-only processor: the published image-processor settings with the resolution from the
    config (min/max pixels, as `load_processor` applies them), and a local tokenizer with the real special ids."""
    from transformers import Qwen2VLImageProcessorPil

    from sensorvla.models.backbones.base import BackboneLoadError
    from sensorvla.models.hf_processors import IMAGE_ONLY_PROCESSORS
    from sensorvla.models.tokenizer import CHAT_TEMPLATE, train_tokenizer

    arch = load_arch(path_or_id)
    config, pre = arch["config"], dict(arch["preprocessor_config"])
    for key in ("min_pixels", "max_pixels", "size", "image_processor_type", "processor_class"):
        pre.pop(key, None)
    size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    image_processor = Qwen2VLImageProcessorPil(**pre, size=size)
    tok = train_tokenizer(first_special_id=REAL_FIRST_SPECIAL_ID)
    vocab = config.get("text_config", config).get("vocab_size", config.get("vocab_size"))
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    if len(tok) > vocab or image_id != config["image_token_id"]:
        raise BackboneLoadError(
            f"{path_or_id}: the local tokenizer ({len(tok)} tokens, <|image_pad|>={image_id}) does not fit the "
            f"config (vocab {vocab}, image_token_id {config['image_token_id']}); fix models/archs/"
        )
    return IMAGE_ONLY_PROCESSORS[config["model_type"]](
        image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE
    )
