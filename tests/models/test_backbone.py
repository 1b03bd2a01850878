"""Tests for the offline tiny Qwen-VL builder and the VL backbone wrapper (loading, prompts, pooling)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

from sensorvla.config import BackboneConfig  # noqa: E402
from sensorvla.models.backbone import (  # noqa: E402
    BackboneLoadError,
    VLBackbone,
    build_messages,
    collate_vl,
    detect_family,
    load_processor,
    load_vl_model,
    pad_token_id,
    process_sample,
    render_prompt,
    resolve_dtype,
)
from sensorvla.models.hf_processors import (  # noqa: E402
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
)
from sensorvla.world.tiny_qwen import FAMILIES, build_tiny_qwen_vl  # noqa: E402

MIN_PX, MAX_PX = 56 * 56, 224 * 224
TEMPLATE = "{instruction}"
PROC_CLASSES = {
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
    "qwen2_vl": ImageOnlyQwen2VLProcessor,
    "qwen3_vl": ImageOnlyQwen3VLProcessor,
}
MODEL_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """One tiny model per family (v5 layout) plus a Qwen2.5-VL in the legacy hub layout."""
    root = tmp_path_factory.mktemp("tiny_backbone")
    dirs = {fam: build_tiny_qwen_vl(root / fam, fam, seed=0) for fam in FAMILIES}
    dirs["hub"] = build_tiny_qwen_vl(
        root / "hub", "qwen2_5_vl", seed=0, layout="hub", min_pixels=28 * 28 * 4, max_pixels=112 * 112
    )
    return dirs


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    """(processor, model) per family, loaded fresh from disk through the public loaders."""
    return {
        fam: (
            load_processor(str(tiny_dirs[fam]), min_pixels=MIN_PX, max_pixels=MAX_PX),
            load_vl_model(str(tiny_dirs[fam]), dtype=torch.float32).eval(),
        )
        for fam in FAMILIES
    }


def _images(n: int, seed: int = 0, hw: tuple[int, int] = (64, 80)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(n)]


def _n_image_pads(proc, sample) -> int:
    return int((sample["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


@torch.no_grad()
def _features(model, proc, samples, num_views: int, cfg: BackboneConfig | None = None):
    backbone = VLBackbone(model, cfg or BackboneConfig(pooling="view_mean"), num_views).eval()
    return backbone(collate_vl(samples, pad_token_id(proc)))


# --------------------------------------------------------------------------------------------- building


@pytest.mark.parametrize("family", FAMILIES)
def test_build_reload_forward(tiny_dirs, loaded, family):
    proc, model = loaded[family]
    assert type(proc) is PROC_CLASSES[family]
    assert type(model).__name__ == MODEL_CLASSES[family]
    assert detect_family(str(tiny_dirs[family])) == family
    # the reloaded weights are exactly the built ones: re-create the seed-0 random init from the saved config
    # (the file stores HF's legacy key names, so compare against a fresh init rather than by file key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = AutoModelForImageTextToText.from_config(model.config).state_dict()
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    saved = load_file(str(tiny_dirs[family] / "model.safetensors"))
    assert len(saved) == len({t.data_ptr() for t in state.values()})  # every stored tensor (lm_head tied)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.parameters())
    samples = [process_sample(proc, _images(2, s), "insert the needle", TEMPLATE) for s in range(2)]
    feats, mask = _features(model, proc, samples, num_views=2)
    d_vl = model.config.text_config.hidden_size
    assert feats.shape == (2, 3, d_vl)
    assert mask.shape == (2, 3) and mask.dtype == torch.bool and bool(mask.all())
    assert torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])  # different images -> different features


def test_build_is_deterministic_and_atomic(tmp_path):
    a = build_tiny_qwen_vl(tmp_path / "a", seed=3)
    b = build_tiny_qwen_vl(tmp_path / "b", seed=3)
    c = build_tiny_qwen_vl(tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    # rebuilding over an existing folder replaces it and leaves no temp dir behind
    build_tiny_qwen_vl(tmp_path / "a", seed=4)
    wa2 = load_file(str(a / "model.safetensors"))
    assert all(torch.equal(wa2[k], wc[k]) for k in wa2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_build_is_tiny_and_offline(tmp_path):
    """The test backbone stays tiny (what keeps the suite fast) and needs no hub: a size bound, not a timer."""
    out = build_tiny_qwen_vl(tmp_path / "t", "qwen3_vl")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert 0 < total < 5 * 2**20, total
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] <= 128 and cfg["text_config"]["num_hidden_layers"] <= 4


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        build_tiny_qwen_vl(tmp_path / "x", "llava")


def test_unsupported_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BackboneLoadError, match="supported"):
        detect_family(str(tmp_path))


# ------------------------------------------------------------------------------------ processor / prompt


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("views", [1, 3])
def test_image_pad_count_matches_grid(loaded, family, views):
    proc, _ = loaded[family]
    sample = process_sample(proc, _images(views), "insert the needle", TEMPLATE)
    grid = sample["image_grid_thw"]
    assert grid.shape == (views, 3)
    assert sample["input_ids"].shape[0] == 1 and sample["attention_mask"].shape == sample["input_ids"].shape
    assert _n_image_pads(proc, sample) == int((grid.prod(dim=1) // 4).sum())
    assert sample["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())


def test_messages_and_prompt(loaded):
    msgs = build_messages("push the tissue", 2, "Task: {instruction}.")
    assert msgs == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "Task: push the tissue."},
            ],
        }
    ]
    proc, _ = loaded["qwen2_5_vl"]
    prompt = render_prompt(proc, "push the tissue", 2, "Task: {instruction}.")
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert prompt.endswith("<|vision_end|>Task: push the tissue.<|im_end|>\n")
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>assistant" not in prompt  # no generation prompt


def test_min_max_pixels_change_token_count(tiny_dirs):
    img = _images(1, hw=(224, 224))
    counts = {}
    for max_px in (112 * 112, 224 * 224):
        proc = load_processor(str(tiny_dirs["qwen2_5_vl"]), min_pixels=MIN_PX, max_pixels=max_px)
        assert proc.image_processor.size["longest_edge"] == max_px
        counts[max_px] = _n_image_pads(proc, process_sample(proc, img, "go", TEMPLATE))
    assert counts == {112 * 112: 16, 224 * 224: 64}
    # min_pixels upscales a tiny image
    tiny = _images(1, hw=(28, 28))
    proc = load_processor(str(tiny_dirs["qwen2_5_vl"]), min_pixels=112 * 112, max_pixels=MAX_PX)
    assert _n_image_pads(proc, process_sample(proc, tiny, "go", TEMPLATE)) == 16


def test_hub_layout_loads(tiny_dirs):
    hub = tiny_dirs["hub"]
    names = {p.name for p in hub.iterdir()}
    assert {"preprocessor_config.json", "chat_template.json", "config.json", "model.safetensors"} <= names
    declared = json.loads((hub / "preprocessor_config.json").read_text())
    assert declared["processor_class"] == "Qwen2_5_VLProcessor"
    proc = load_processor(str(hub), min_pixels=declared["min_pixels"], max_pixels=declared["max_pixels"])
    assert type(proc) is ImageOnlyQwen2_5_VLProcessor
    assert proc.image_processor.size["shortest_edge"] == 28 * 28 * 4
    assert proc.image_processor.size["longest_edge"] == 112 * 112
    assert proc.chat_template == json.loads((hub / "chat_template.json").read_text())["chat_template"]
    sample = process_sample(proc, _images(1, hw=(224, 224)), "go", TEMPLATE)
    assert _n_image_pads(proc, sample) == 16  # 112x112 / 28^2
    # the caller's resolution wins over the declared one (the real 3B declares max 12845056)
    proc_big = load_processor(str(hub), min_pixels=MIN_PX, max_pixels=MAX_PX)
    assert _n_image_pads(proc_big, process_sample(proc_big, _images(1, hw=(224, 224)), "go", TEMPLATE)) == 64
    model = load_vl_model(str(hub), dtype=torch.float32).eval()
    feats, _ = _features(model, proc, [sample], num_views=1)
    assert feats.shape == (1, 2, 64) and torch.isfinite(feats).all()


def test_hub_id_offline_fails_fast_with_fix():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError, match="local folder") as err:
        load_processor("sensorvla-tests/not-a-downloaded-model", min_pixels=MIN_PX, max_pixels=MAX_PX)
    assert "HF_HUB_OFFLINE" in str(err.value) and "--vl-model" in str(err.value)
    with pytest.raises(OSError, match="local folder"):
        load_vl_model("sensorvla-tests/not-a-downloaded-model", dtype=torch.float32)


def test_collate_vl_right_pads(loaded):
    proc, _ = loaded["qwen2_5_vl"]
    short = process_sample(proc, _images(1), "go", TEMPLATE)
    long = process_sample(proc, _images(2), "insert the needle slowly", TEMPLATE)
    pad = pad_token_id(proc)
    assert pad == proc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = collate_vl([short, long], pad)
    ls, ll = short["input_ids"].shape[1], long["input_ids"].shape[1]
    assert batch["input_ids"].shape == (2, ll) and batch["attention_mask"].shape == (2, ll)
    assert torch.equal(batch["input_ids"][0, :ls], short["input_ids"][0])
    assert (batch["input_ids"][0, ls:] == pad).all() and (batch["attention_mask"][0, ls:] == 0).all()
    assert batch["attention_mask"][0, :ls].all() and batch["attention_mask"][1].all()
    assert batch["mm_token_type_ids"].shape == (2, ll) and (batch["mm_token_type_ids"][0, ls:] == 0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([short["pixel_values"], long["pixel_values"]]))
    assert batch["image_grid_thw"].shape == (3, 3)


# ----------------------------------------------------------------------------------------------- pooling


def test_view_masks_cover_views_and_instruction(loaded):
    proc, model = loaded["qwen2_5_vl"]
    sample = process_sample(proc, _images(3), "insert the needle", TEMPLATE)
    backbone = VLBackbone(model, BackboneConfig(pooling="view_mean"), 3)
    masks = backbone.view_masks(sample["input_ids"], sample["attention_mask"])[0]
    per_view = (sample["image_grid_thw"].prod(dim=1) // 4).tolist()
    assert masks[:3].sum(dim=1).tolist() == per_view
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any()
    assert proc.tokenizer.decode(sample["input_ids"][0][masks[3]]) == "insert the needle"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_view_pooling_separates_views(loaded, family):
    proc, model = loaded[family]
    imgs = _images(3, seed=1)
    changed = [imgs[0], imgs[1], _images(1, seed=99)[0]]
    f1, _ = _features(model, proc, [process_sample(proc, imgs, "go", TEMPLATE)], 3)
    f2, _ = _features(model, proc, [process_sample(proc, changed, "go", TEMPLATE)], 3)
    assert torch.allclose(f1[0, 0], f2[0, 0], atol=1e-5) and torch.allclose(f1[0, 1], f2[0, 1], atol=1e-5)
    assert not torch.allclose(f1[0, 2], f2[0, 2], atol=1e-3)
    assert not torch.allclose(f1[0, 3], f2[0, 3], atol=1e-4)  # the instruction token sees all views


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance(loaded, family):
    proc, model = loaded[family]
    short = process_sample(proc, _images(2, seed=5), "go", TEMPLATE)
    long = process_sample(
        proc,
        _images(2, seed=6, hw=(160, 200)),
        "insert the needle into the eye phantom slowly and stop at contact",
        TEMPLATE,
    )
    assert long["input_ids"].shape[1] > short["input_ids"].shape[1] + 10
    alone, _ = _features(model, proc, [short], 2)
    both, mask = _features(model, proc, [short, long], 2)
    assert mask.all()
    torch.testing.assert_close(both[0], alone[0], atol=2e-5, rtol=1e-4)
    long_alone, _ = _features(model, proc, [long], 2)
    torch.testing.assert_close(both[1], long_alone[0], atol=2e-5, rtol=1e-4)


def test_resampler_pooling_trains_queries(loaded):
    proc, model = loaded["qwen2_5_vl"]
    cfg = BackboneConfig(pooling="resampler", num_queries=5)
    backbone = VLBackbone(model, cfg, num_views=2)
    assert backbone.num_tokens == 5 and backbone.hidden_size == 64
    samples = [process_sample(proc, _images(2, seed=s), "go" * (s + 1), TEMPLATE) for s in range(2)]
    batch = collate_vl(samples, pad_token_id(proc))
    with torch.no_grad():
        feats, fmask = backbone.encode_frozen(batch)
    assert feats.shape == (2, batch["input_ids"].shape[1], 64)
    assert torch.equal(fmask, batch["attention_mask"].bool())
    out, mask = backbone({"vl_features": feats, "vl_mask": fmask})
    assert out.shape == (2, 5, 64) and mask.shape == (2, 5) and mask.all()
    out.square().mean().backward()
    assert backbone.queries.grad is not None and backbone.queries.grad.abs().sum() > 0
    # padded keys are ignored: garbage in the padding does not move the output
    noisy = feats.clone()
    noisy[~fmask] = 1e3
    with torch.no_grad():
        torch.testing.assert_close(backbone.project(noisy, fmask)[0], out.detach())


def test_view_mean_project_is_identity_and_cache_path_matches(loaded):
    proc, model = loaded["qwen2_5_vl"]
    backbone = VLBackbone(model, BackboneConfig(pooling="view_mean"), num_views=1).eval()
    assert backbone.num_tokens == 2
    batch = collate_vl([process_sample(proc, _images(1), "go", TEMPLATE)], pad_token_id(proc))
    with torch.no_grad():
        feats, mask = backbone.encode_frozen(batch)
        direct, _ = backbone(batch)
        cached, cmask = backbone({"vl_features": feats, "vl_mask": mask})
    assert torch.equal(direct, cached) and cmask.all()


def test_backbone_keeps_hf_module_names(loaded):
    _, model = loaded["qwen2_5_vl"]
    backbone = VLBackbone(model, BackboneConfig(), num_views=1)
    names = [n for n, _ in backbone.named_parameters()]
    assert any(n.startswith("model.visual.") for n in names)
    assert any(n.startswith("model.language_model.") and n.endswith("q_proj.weight") for n in names)
    assert not any("lm_head" in n for n in names)


def test_activation_checkpointing_keeps_gradients(tiny_dirs):
    proc = load_processor(str(tiny_dirs["qwen2_vl"]), min_pixels=MIN_PX, max_pixels=MAX_PX)
    grads = []
    for checkpointing in (False, True):
        model = load_vl_model(str(tiny_dirs["qwen2_vl"]), dtype=torch.float32)
        torch.manual_seed(0)  # the token-position projection of pooling "all" is freshly initialised
        backbone = VLBackbone(model, BackboneConfig(), num_views=1).train()
        if checkpointing:
            backbone.enable_activation_checkpointing()
            assert backbone.model.is_gradient_checkpointing
        feats, _ = backbone(collate_vl([process_sample(proc, _images(1), "go", TEMPLATE)], pad_token_id(proc)))
        feats.square().sum().backward()
        grads.append(backbone.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32
