"""The sensor encoder's cheaper inference path computes the same function: the unfolded Conv1d equals
nn.Conv1d, and a no-grad call equals the training-mode computation (dropout off) on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sensorvla.config import SensorConfig
from sensorvla.data.timeline import SensorWindow
from sensorvla.models.sensors.encoder import SensorEncoder
from sensorvla.models.sensors.profile1d import conv1d_unfold
from sensorvla.streams import legacy_streams


@pytest.mark.parametrize(("c_in", "length"), [(1, 32), (16, 16), (16, 5)])
def test_unfolded_conv_equals_conv1d(c_in, length):
    torch.manual_seed(0)
    conv = nn.Conv1d(c_in, 16, kernel_size=5, stride=2, padding=2)
    x = torch.randn(7, c_in, length)
    with torch.no_grad():
        torch.testing.assert_close(conv1d_unfold(x, conv), conv(x), atol=1e-6, rtol=0)


def make() -> SensorEncoder:
    torch.manual_seed(0)
    return SensorEncoder(SensorConfig(dropout=0.0), legacy_streams(33, 1), SensorWindow(0.1, 32, 0.02)).eval()


@pytest.mark.parametrize("case", ["all_valid", "gaps", "no_sensor"])
def test_inference_path_equals_the_grad_path(case):
    enc = make()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 33, generator=g)
    mask, has = torch.ones(2, 32, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    if case == "gaps":
        mask[0, 5:9] = False
    if case == "no_sensor":
        has[1] = False
    with torch.inference_mode():  # the unfolded convs, no masks when all valid
        fast, fast_mask = enc({"sensor": x, "sensor_mask": mask, "has_sensor": has})
    ref, _ = enc({"sensor": x, "sensor_mask": mask, "has_sensor": has})  # grad enabled: nn.Conv1d
    torch.testing.assert_close(fast, ref.detach(), atol=1e-5, rtol=0)
    assert fast_mask.all()
    if case == "no_sensor":  # the learned "missing" tokens, not an encoding
        torch.testing.assert_close(fast[1], enc.groups["sensor"].missing_tokens[0].detach())


def test_checkpoint_keys_of_the_legacy_pair():
    keys = {k.removeprefix("groups.sensor.") for k in make().state_dict()}
    assert {"time_pos", "queries", "missing_tokens", "embed.ascan.conv.0.weight", "embed.ascan.proj.weight"} <= keys
    assert "embed.force.proj.weight" in keys and not any("unfold" in k for k in keys)
