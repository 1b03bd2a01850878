"""The warmup-cosine LR schedule (`training.loop.warmup_cosine`) against transformers'
`get_cosine_with_min_lr_schedule_with_warmup`: the same cosine to `min_lr_ratio`, bit for bit, within the schedule;
the two differences that keep our ten lines (docs/decisions.md, "LR schedule"): transformers' warmup starts at LR 0
(a first optimizer step that does not move the weights) and its cosine turns back up after the schedule's end,
which a resumed run extended past its saved schedule (`--train.max-steps`) reaches; ours holds the minimum."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from sensorvla.training.loop import warmup_cosine


def transformers_factors(total: int, warmup: int, min_ratio: float, steps: int) -> list[float]:
    """transformers' LR factors for `steps` optimizer steps (an optimizer at LR 1: the LR is the factor)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_ratio)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("total", "ratio", "min_ratio"), [(100, 0.05, 0.1), (37, 0.1, 0.0), (10, 0.0, 0.25)])
def test_schedule_is_transformers_cosine_with_warmup_from_one_step(total, ratio, min_ratio):
    ours = warmup_cosine(total, ratio, min_ratio)
    warmup = max(1, round(total * ratio)) if ratio > 0 else 0
    theirs = transformers_factors(total, warmup, min_ratio, total + 5)
    for step in range(warmup, total + 1):  # the cosine: bit-equal
        assert ours(step) == theirs[step], step
    for step in range(warmup):  # the warmup: ours is theirs one step ahead, (s + 1) / w, never 0
        assert ours(step) == pytest.approx((step + 1) / warmup) and ours(step) > 0
        assert theirs[step] == pytest.approx(step / warmup)
    for step in range(total + 1, total + 5):  # past the end: ours holds the minimum, theirs turns back up
        assert ours(step) == pytest.approx(min_ratio) and theirs[step] > theirs[total]
