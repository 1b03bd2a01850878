"""Real-size random architectures (`--vl-model random:<hub id>`): shipped configs, counts on the meta device,
the processor's real settings and token ids, and the load path hooks. Nothing here materializes a real-size
model except the slow test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from sensorvla.config import BackboneConfig  # noqa: E402
from sensorvla.models import random_vl  # noqa: E402
from sensorvla.models.backbone import (  # noqa: E402
    BackboneLoadError,
    VLBackbone,
    load_processor,
    load_vl_model,
    process_sample,
)
from sensorvla.models.hf_processors import IMAGE_ONLY_PROCESSORS  # noqa: E402

MODELS = random_vl.available()
EXPECTED = {
    "Qwen/Qwen2-VL-2B-Instruct",
    "Qwen/Qwen2-VL-7B-Instruct",
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen/Qwen3-VL-2B-Instruct",
    "Qwen/Qwen3-VL-4B-Instruct",
    "Qwen/Qwen3-VL-8B-Instruct",
}


def _meta_model(name: str, dtype=torch.bfloat16):
    with torch.device("meta"):
        return load_vl_model(random_vl.RANDOM_PREFIX + name, dtype=dtype)


def test_every_issue_model_is_shipped_with_its_source():
    assert set(MODELS) == EXPECTED
    for name in MODELS:
        arch = random_vl.load_arch(name)
        src = arch["_source"]
        assert src["hub_repo"] == name
        assert src["config_json"].startswith(f"https://huggingface.co/{name}/")
        assert src["transcribed_from"], f"{name}: no public copy recorded"
        assert arch["published_num_parameters"] > 1e9
        assert arch["config"]["model_type"] in IMAGE_ONLY_PROCESSORS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count_matches_published_size_on_meta(name):
    model = _meta_model(name)
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"}
    assert {p.dtype for p in params} == {torch.bfloat16}
    n = sum(p.numel() for p in params)  # tied embeddings once, as in the safetensors file
    published = random_vl.load_arch(name)["published_num_parameters"]
    assert abs(n / published - 1) < 0.01, f"{name}: {n:,} parameters vs published {published:,}"


def test_known_exact_counts_and_tying():
    """Exact counts of two models (offline-stack.md section 3) and the tie flag of the 7B (untied)."""
    assert sum(p.numel() for p in _meta_model("Qwen/Qwen2.5-VL-3B-Instruct").parameters()) == 3_754_622_976
    m7 = _meta_model("Qwen/Qwen2.5-VL-7B-Instruct")
    assert sum(p.numel() for p in m7.parameters()) == 8_292_166_656
    assert m7.lm_head.weight is not m7.model.language_model.embed_tokens.weight


class _Allocations(TorchDispatchMode):
    """Records (dtype, numel) of every tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(t.dtype, t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_construction_is_directly_in_the_requested_dtype():
    """No fp32 copy of any weight-sized tensor is ever made while building in bf16 (meta, so it is cheap)."""
    with _Allocations() as rec, torch.device("meta"):
        random_vl.build_random_vl("random:Qwen/Qwen2-VL-2B-Instruct", dtype=torch.bfloat16)
    big = [(d, n) for d, n in rec.made if n >= 1_000_000]
    assert big, "the recorder saw no weight creation"
    assert all(d == torch.bfloat16 for d, _ in big), sorted({d for d, _ in big}, key=str)


@pytest.mark.parametrize(
    "name,patch",
    [("Qwen/Qwen2.5-VL-3B-Instruct", 14), ("Qwen/Qwen2-VL-7B-Instruct", 14), ("Qwen/Qwen3-VL-4B-Instruct", 16)],
)
def test_processor_has_real_settings_and_ids_that_fit_the_config(name, patch):
    config = random_vl.load_arch(name)["config"]
    vocab = config.get("text_config", config).get("vocab_size", config.get("vocab_size"))
    proc = load_processor(random_vl.RANDOM_PREFIX + name, min_pixels=112 * 112, max_pixels=224 * 224)
    assert isinstance(proc, IMAGE_ONLY_PROCESSORS[config["model_type"]])
    ip = proc.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (patch, 2, 2)
    assert ip.size == {"shortest_edge": 112 * 112, "longest_edge": 224 * 224}  # the config's resolution wins
    tok = proc.tokenizer
    assert len(tok) <= vocab
    for key, token in [
        ("image_token_id", "<|image_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("video_token_id", "<|video_pad|>"),
    ]:
        assert tok.convert_tokens_to_ids(token) == config[key], key
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    out = process_sample(proc, [np.zeros((224, 224, 3), np.uint8)] * 2, "insert the needle", "{instruction}")
    n_img = int((out["input_ids"] == config["image_token_id"]).sum())
    assert n_img == (224 // (patch * 2)) ** 2 * 2  # one token per merged 2x2 patch block, per view
    assert int(out["input_ids"].max()) < vocab


def test_backbone_wrapper_on_a_meta_real_size_model():
    """VLBackbone wraps the meta model exactly like a loaded one; view masks work on the real processor's ids."""
    name = "random:Qwen/Qwen2.5-VL-3B-Instruct"
    model = _meta_model(name.removeprefix("random:"))
    bb = VLBackbone(model, BackboneConfig(vl_model=name, pooling="view_mean"), num_views=2)
    assert bb.hidden_size == 2048 and bb.num_tokens == 3
    grid = VLBackbone(model, BackboneConfig(vl_model=name, pooling="grid", grid_size=4), num_views=2)
    assert grid.num_tokens == 2 * 16 + 1
    assert VLBackbone(model, BackboneConfig(vl_model=name, pooling="all"), num_views=2).num_tokens is None
    proc = load_processor(name, min_pixels=56 * 56, max_pixels=224 * 224)
    out = process_sample(proc, [np.zeros((112, 112, 3), np.uint8)] * 2, "stop at the membrane", "{instruction}")
    masks = bb.view_masks(out["input_ids"], out["attention_mask"])
    assert masks[0, 0].sum() == masks[0, 1].sum() == 16  # 112 px / 28 px per token, squared
    text = proc.tokenizer.decode(out["input_ids"][0][masks[0, 2]])
    assert text == "stop at the membrane"


def test_unknown_random_id_names_the_choices():
    with pytest.raises(BackboneLoadError, match="random:Qwen/Qwen2.5-VL-3B-Instruct"):
        load_vl_model("random:Qwen/Qwen9-VL-1B", dtype=torch.bfloat16)
    with pytest.raises(BackboneLoadError, match="no shipped architecture"):
        load_processor("random:nope/nope", min_pixels=1, max_pixels=2)


def test_real_special_ids_tokenizer_keeps_text_tokens():
    """The padded vocabulary leaves ordinary text tokenization unchanged and never emits a filler token."""
    from sensorvla.models.tokenizer import train_tokenizer

    plain, real = train_tokenizer(), train_tokenizer(first_special_id=random_vl.REAL_FIRST_SPECIAL_ID)
    text = "Insert the needle slowly and stop when you feel contact 42."
    assert plain.tokenize(text) == real.tokenize(text)
    ids = real(text + "<|im_end|>")["input_ids"]
    assert ids[-1] == 151645 and all(i < 1000 for i in ids[:-1])
    with pytest.raises(ValueError, match="first_special_id"):
        train_tokenizer(first_special_id=10)


@pytest.mark.slow
def test_materialized_random_model_is_deterministic_and_runs():
    """Builds Qwen2-VL-2B for real in bf16 (~4.4 GB): same weights for the same seed, one forward through
    VLBackbone gives finite features of the real width."""
    name = "random:Qwen/Qwen2-VL-2B-Instruct"
    model = load_vl_model(name, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tie_word_embeddings
    first = model.model.language_model.embed_tokens.weight[:4, :64].clone()
    bb = VLBackbone(model, BackboneConfig(vl_model=name, pooling="view_mean"), num_views=1)  # 1 view + instruction
    proc = load_processor(name, min_pixels=56 * 56, max_pixels=112 * 112)
    batch = process_sample(proc, [np.full((112, 112, 3), 128, np.uint8)], "touch the surface", "{instruction}")
    with torch.inference_mode():
        feats, mask = bb.encode_frozen(batch)
    assert feats.shape == (1, 2, 1536) and torch.isfinite(feats.float()).all() and mask.all()
    del model, bb
    again = load_vl_model(name, dtype=torch.bfloat16)
    assert torch.equal(again.model.language_model.embed_tokens.weight[:4, :64], first)
