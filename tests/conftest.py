"""Shared fixtures: an offline tiny Qwen-VL and a small synthetic insertion dataset, built once per session."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Caches (norm stats, file hashes) live in one fresh folder per test session, never the user's ~/.cache: a
# stats file cached by an older checkout of the code must not answer for this one.
# The folder is removed when the session ends (pytest_sessionfinish) unless the caller named one.
_OWN_CACHE = None if "SENSORVLA_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="sensorvla-test-cache-")
if _OWN_CACHE:
    os.environ["SENSORVLA_CACHE_DIR"] = _OWN_CACHE
os.environ.pop("SENSORVLA_COMPILED_CACHE", None)  # compiled ticks too go under it (inference/tick.py)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved in the hub layout (model + tokenizer + image-only processor)."""
    from sensorvla.world.tiny_qwen import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_vl") / "qwen2_5_vl", family="qwen2_5_vl")


@pytest.fixture(scope="session")
def synth_dataset_dir(tmp_path_factory):
    """A small synthetic insertion dataset (with some sensor-less episodes) in the native format."""
    from sensorvla.world.synth import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("synth") / "insertion", num_episodes=10, seed=0, image_size=64, progress=False
    )


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (the default `-m 'not slow and not gpu'` skips them); `-m slow` runs "
        "only those",
    )


def pytest_configure(config):
    # pyproject's addopts deselects slow tests with `-m 'not slow and not gpu'`; --run-slow widens that
    # expression (gpu stays deselected: `-m gpu` runs those). An explicit `-m ...` still wins without it.
    if config.getoption("--run-slow") and config.option.markexpr == "not slow and not gpu":
        config.option.markexpr = "not gpu"


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
