"""The tests' oracle of a finetune mode: the parameter names that should train, and the assertion that they do."""

from __future__ import annotations

from torch import nn

from sensorvla.models.finetune import HF_BASE_PREFIX, _unreached, is_lora_param, is_vision_param


def expected_trainable(policy: nn.Module, mode: str, full_vision: bool = False) -> set[str]:
    """The trainable parameter names that `mode` (+ `full_vision`) declares (to assert the real set)."""
    names, unreached = set(), _unreached(policy)
    for n, _ in policy.named_parameters():
        if (
            not n.startswith(HF_BASE_PREFIX)
            or (mode == "full" and not unreached(n[len(HF_BASE_PREFIX) :]))
            or (mode == "lora" and is_lora_param(n))
            or (full_vision and is_vision_param(n))
        ):
            names.add(n)
    return names


def assert_trainable_set(policy: nn.Module, mode: str, full_vision: bool = False) -> None:
    """Raise AssertionError unless the parameters with requires_grad are exactly the declared set."""
    actual = {n for n, p in policy.named_parameters() if p.requires_grad}
    expected = expected_trainable(policy, mode, full_vision)
    if actual != expected:
        extra, missing = sorted(actual - expected)[:10], sorted(expected - actual)[:10]
        raise AssertionError(f"trainable set differs from finetune mode {mode!r}: extra={extra} missing={missing}")
