"""process_sample's direct path (the image processor's own rescale/normalize/patchify + the cached prompt
tokens) gives exactly what the full HF processor call gives, for every family; other sizes fall back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sensorvla.models.backbone import load_processor, process_sample, render_prompt
from sensorvla.models.backbones import qwen
from sensorvla.models.backbones.base import full_process
from sensorvla.world.tiny_qwen import FAMILIES, build_tiny_qwen_vl

TEMPLATE = "{instruction}"


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastproc")
    return {f: load_processor(str(build_tiny_qwen_vl(root / f, family=f)), min_pixels=56 * 56, max_pixels=224 * 224)
            for f in FAMILIES}  # fmt: skip


def _full(proc, images, instruction):
    return full_process(proc, images, render_prompt(proc, instruction, len(images), TEMPLATE))


def _views(seed: int, hw: tuple[int, int], n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_path_equals_the_full_processor(processors, family):
    proc = processors[family]
    factor = proc.image_processor.patch_size * proc.image_processor.merge_size
    hw = (4 * factor, 3 * factor)  # a size the processor keeps: the direct path runs
    assert qwen.fast_pixels(proc.image_processor, _views(0, hw)) is not None
    for seed, instruction in ((0, "insert the peg"), (1, "insert the peg"), (2, "stop at the layer")):
        views = _views(seed, hw)
        got, want = process_sample(proc, views, instruction, TEMPLATE), _full(proc, views, instruction)
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)  # new pixels, reused tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_sizes_the_processor_resizes_take_the_full_path(processors, family):
    proc = processors[family]
    views = _views(3, (61, 83))
    assert qwen.fast_pixels(proc.image_processor, views) is None
    got, want = process_sample(proc, views, "go", TEMPLATE), _full(proc, views, "go")
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hw", [(61, 83), (480, 640)])  # odd sizes, and a camera's frame over max_pixels
def test_resized_views_are_bit_equal_to_the_full_processor(processors, family, hw, monkeypatch):
    """Views the processor resizes go through its own resize / rescale / normalize / patchify without the call
    (`_resized_pixels`): bit-equal to the full call, which is never made for them."""
    proc = processors[family]
    views = _views(4, hw)
    want = _full(proc, views, "go")
    assert qwen.resized_pixels(proc.image_processor, views) is not None
    calls = []
    monkeypatch.setattr(qwen, "full_process", lambda *a: calls.append(1) or full_process(*a))
    process_sample(proc, views, "go", TEMPLATE)  # fills the prompt cache for this grid (one full call)
    calls.clear()
    got = process_sample(proc, _views(4, hw), "go", TEMPLATE)
    assert calls == []  # pixels from `_resized_pixels`, tokens from the cache
    for key in want:
        assert torch.equal(got[key], want[key]), key
