"""`--sensor_loss_weight` w: in one optimizer step a sensor sample's gradient counts exactly w times a
sensor-less one's, whichever micro-batch of the accumulation window it is in (an all-sensor one too)."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_cfg

from sensorvla.config import resolve_from_meta
from sensorvla.data.format import load_meta
from sensorvla.models.backbone import load_processor, pad_token_id
from sensorvla.models.policy import build_policy
from sensorvla.models.processor import PolicyProcessor, collate
from sensorvla.training.data_setup import build_normalizer, ensure_stats, raw_dataset
from sensorvla.training.distributed import DistInfo
from sensorvla.training.loop import backward_window, window_weight_sum

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def setup(tiny_vl_dir, synth_dataset_dir, tmp_path_factory):
    cfg = tiny_cfg(tiny_vl_dir, synth_dataset_dir, tmp_path_factory.mktemp("w")).validate()
    cfg = resolve_from_meta(cfg, load_meta(synth_dataset_dir))
    torch.manual_seed(0)
    policy = build_policy(cfg).eval()  # eval: no dropout, so each forward is a fixed function
    proc = load_processor(str(tiny_vl_dir), min_pixels=cfg.model.backbone.min_pixels, max_pixels=224 * 224)
    norm = build_normalizer(ensure_stats(cfg, ONE_PROCESS, progress=False), cfg)
    transform = PolicyProcessor(norm, proc, cfg.model.backbone.prompt_template, cfg.model.state_dim)
    ds = raw_dataset(cfg, "train")
    samples = []
    for i, with_sensor in ((0, True), (40, False), (80, True)):
        raw = ds[i]
        assert raw["has_sensor"]
        if not with_sensor:  # the same kind of sample, recorded without the sensor
            raw["has_sensor"], raw["sensor_mask"], raw["sensor"] = False, raw["sensor_mask"] * False, raw["sensor"] * 0
        samples.append(transform(raw))
    return policy, samples, pad_token_id(proc)


def grads(policy, fn) -> dict[str, torch.Tensor]:
    policy.zero_grad(set_to_none=True)
    fn()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding of sums: 1e-4 relative, plus 1e-5 of the tensor's largest entry (entries
    near 0 carry cancellation error). A wrong ratio (1:1 instead of w:1) misses by tens of percent."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-9, msg=name)


def per_sample_grad(policy, sample, pad) -> dict[str, torch.Tensor]:
    return grads(policy, lambda: policy(collate([sample], pad), sensor_loss_weight=1.0)[0].backward())


@pytest.mark.parametrize("w", [2.0, 5.0])
def test_gradient_ratio_is_w_to_1_across_the_window(setup, w):
    policy, (s1, n, s2), pad = setup
    g_s1, g_n, g_s2 = (per_sample_grad(policy, x, pad) for x in (s1, n, s2))
    window = [collate([s1, n], pad), collate([s2], pad)]  # a mixed micro-batch, then an all-sensor one
    assert window_weight_sum(window, w) == 2 * w + 1
    got = grads(policy, lambda: backward_window(policy, window, sensor_loss_weight=w, info=ONE_PROCESS))
    assert got.keys() == g_n.keys() and len(got) > 10
    for name in got:
        close(got[name], (w * g_s1[name] + g_n[name] + w * g_s2[name]) / (2 * w + 1), name)


def test_all_sensor_window_and_weight_zero(setup):
    """w only rescales relative to sensor-less samples: an all-sensor window is a plain mean, and w = 0
    leaves only the sensor-less sample's gradient."""
    policy, (s1, n, s2), pad = setup
    g_s1, g_n, g_s2 = (per_sample_grad(policy, x, pad) for x in (s1, n, s2))
    window = [collate([s1], pad), collate([s2], pad)]
    got = grads(policy, lambda: backward_window(policy, window, sensor_loss_weight=3.0, info=ONE_PROCESS))
    for name in got:
        close(got[name], (g_s1[name] + g_s2[name]) / 2, name)
    window = [collate([s1], pad), collate([n], pad)]
    got = grads(policy, lambda: backward_window(policy, window, sensor_loss_weight=0.0, info=ONE_PROCESS))
    for name in g_n:
        close(got[name], g_n[name], name)


def test_the_old_per_micro_batch_normalisation_is_caught(setup):
    """The check above can fail: dividing each micro-batch by its own weight sum (the old behaviour) gives
    ((w g_s1 + g_n) / (w + 1) + g_s2) / 2, which misses the w:1 expectation."""
    policy, (s1, n, s2), pad = setup
    w = 5.0
    g_s1, g_n, g_s2 = (per_sample_grad(policy, x, pad) for x in (s1, n, s2))
    old = {k: ((w * g_s1[k] + g_n[k]) / (w + 1) + g_s2[k]) / 2 for k in g_n}
    new = {k: (w * g_s1[k] + g_n[k] + w * g_s2[k]) / (2 * w + 1) for k in g_n}
    missed = 0
    for k in g_n:
        try:
            close(old[k], new[k], k)
        except AssertionError:
            missed += 1
    assert missed > len(g_n) // 2


def test_window_metrics_average_over_the_samples_each_covers(setup):
    """`loss_sensor` is the mean over the window's sensor samples alone: a micro-batch without one leaves it
    unchanged (the old mean over micro-batches halved it); `n_*` add up over the window."""
    policy, (s1, n, s2), pad = setup
    torch.manual_seed(0)
    _, alone = policy(collate([s1, s2], pad), sensor_loss_weight=1.0)
    _, none = policy(collate([n], pad), sensor_loss_weight=1.0)
    window = [collate([s1, s2], pad), collate([n], pad)]
    _, m, seen = backward_window(policy, window, sensor_loss_weight=2.0, info=ONE_PROCESS)
    policy.zero_grad(set_to_none=True)
    assert seen == 3 and m["n_sensor"] == 2 and m["n_no_sensor"] == 1
    assert m["loss_sensor"] == pytest.approx(alone["loss_sensor"], rel=1e-5)
    assert m["loss_no_sensor"] == pytest.approx(none["loss_no_sensor"], rel=1e-5)
    mean = (2 * alone["loss_unweighted"] + none["loss_unweighted"]) / 3  # per sample, not per micro-batch
    assert m["loss_unweighted"] == pytest.approx(mean, rel=1e-5)


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_window_scaling_is_bit_equal_to_scaling_each_gradient(setup, w):
    """backward_window rescales the window's gradients in one foreach call (skipped when the factor is 1: a window
    of one sensor-less sample, or w = 1 over one sample): bit-equal to scaling each parameter's gradient in a loop,
    so training results do not change (the resume tests check bit-exact runs on top of this)."""
    policy, (s1, n, s2), pad = setup

    def rescaled_by_hand(window):
        for batch in window:
            policy(batch, sensor_loss_weight=w, weight_sum=1.0)[0].backward()
        scale = 1.0 / max(window_weight_sum(window, w), 1e-8)
        with torch.no_grad():
            for p in policy.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)

    for window in ([collate([s1, n], pad), collate([s2], pad)], [collate([n], pad)]):
        got = grads(policy, lambda win=window: backward_window(policy, win, sensor_loss_weight=w, info=ONE_PROCESS))
        expected = grads(policy, lambda win=window: rescaled_by_hand(win))
        assert got.keys() == expected.keys() and len(got) > 10
        assert all(torch.equal(got[k], expected[k]) for k in got)
