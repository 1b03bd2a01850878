"""The planner against measured memory: real `train(cfg)` steps on CPU, peak taken by the allocator after the first
optimizer step (`plan/measure.py`), planned on the meta device for `--device cpu`. Must agree within 15 %.

Fast: the tiny model, fp32, stage 1 (uncached) and stage 2 LoRA. Slow: bf16, the cache, full fine-tuning,
activation checkpointing, and a mid-size (141 M parameter) random model in fp32 and bf16.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from calibration import calibration_config, planned_and_measured  # noqa: E402

TOLERANCE = 0.15
MID = {"text_hidden": 1024, "text_layers": 12, "vision_hidden": 512, "vision_depth": 8}  # 141.6 M parameters


@pytest.fixture(scope="module")
def data224(tmp_path_factory):
    """3 episodes, 2 views of 224 x 224 (64 image tokens per view): VL activations are not negligible."""
    return _synth224(tmp_path_factory)


@pytest.fixture(scope="module")
def data224_no_val(tmp_path_factory):
    """The same data for runs without a validation split: their train split (and so their norm stats, which the
    dataset folder keeps) differs from the other runs', and stats of another split are refused."""
    return _synth224(tmp_path_factory)


def _synth224(tmp_path_factory):
    from sensorvla.world.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("calib") / "d224", num_episodes=3, image_size=224, progress=False)


@pytest.fixture(scope="module")
def mid_vl(tmp_path_factory):
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("mid") / "mid", **MID)


def _cfg(vl, data, out, scenario: str, dtype: str, **train):
    return calibration_config(vl, data, out, scenario, dtype, **train)


def _check(cfg, scenario: str) -> tuple[int, int]:
    planned, measured = planned_and_measured(cfg, scenario, "cpu")
    assert abs(planned / measured - 1) <= TOLERANCE, (
        f"{scenario}: planned {planned / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB "
        f"({planned / measured - 1:+.1%})"
    )
    return planned, measured


@pytest.mark.parametrize("scenario", ["none", "lora"])
def test_tiny_fp32_within_15_percent(tiny_vl_dir, data224, tmp_path, scenario):
    _check(_cfg(tiny_vl_dir, data224, tmp_path, scenario, "float32"), scenario)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario,dtype",
    [
        ("none", "bfloat16"),
        ("cached", "float32"),
        ("cached", "bfloat16"),
        ("lora", "bfloat16"),
        ("full", "float32"),
        ("full", "bfloat16"),
        ("lora+ckpt", "float32"),
    ],
)
def test_tiny_other_scenarios_within_15_percent(tiny_vl_dir, data224, tmp_path, scenario, dtype):
    _check(_cfg(tiny_vl_dir, data224, tmp_path, scenario, dtype), scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["none", "lora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mid_size_within_15_percent(mid_vl, data224_no_val, tmp_path, scenario, dtype):
    """141 M parameters; one view, 2 steps of 2 micro-batches of 2, no validation (keeps it to about a minute)."""
    cfg = _cfg(mid_vl, data224_no_val, tmp_path, scenario, dtype, batch_size=2, max_steps=2)
    cfg.data.views = ("front",)
    cfg.data.val_fraction = 0.0
    _check(cfg, scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["none", "lora"])
def test_tiny_without_accumulation_or_validation(tiny_vl_dir, data224_no_val, tmp_path, scenario):
    """Gradients appear during each backward (no accumulation) and no validation batches pile up."""
    cfg = _cfg(tiny_vl_dir, data224_no_val, tmp_path, scenario, "bfloat16", grad_accum_steps=1)
    cfg.data.val_fraction = 0.0
    _check(cfg, scenario)


@pytest.mark.slow
@pytest.mark.parametrize(
    "pooling,scenario", [("grid", "cached"), ("all", "cached"), ("all", "lora"), ("resampler", "lora")]
)
def test_tiny_token_modes_within_15_percent(tiny_vl_dir, data224, tmp_path, pooling, scenario):
    _check(calibration_config(tiny_vl_dir, data224, tmp_path, scenario, "float32", pooling=pooling), scenario)
