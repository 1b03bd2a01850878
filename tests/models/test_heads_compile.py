"""`--runtime.compile` (`runtime.compile_policy`): the compiled sensor encoder + head give the eager outputs
(inference samples, training losses and gradients) and keep every parameter name. The default-suite test
captures graphs with the "eager" backend (dynamo tracing, fast); the slow one runs inductor's generated code."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sensorvla.config import HeadConfig, SensorConfig, SensorVLAConfig
from sensorvla.data.timeline import SensorWindow
from sensorvla.models.fusion import build_fusion
from sensorvla.models.heads import build_head
from sensorvla.models.sensors.encoder import SensorEncoder
from sensorvla.runtime import compile_policy
from sensorvla.streams import legacy_streams

D = 32


class Parts(nn.Module):
    """The compiled parts of a VLAPolicy (sensor_encoder, fusion, head) without a VL backbone."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        cfg = SensorConfig(hidden_dim=D, num_heads=2, dropout=0.0)
        self.sensor_encoder = SensorEncoder(cfg, legacy_streams(9, 1), SensorWindow(0.1, 16, 0.02))
        cfg = SensorVLAConfig().model.fusion
        cfg.hidden_dim, cfg.num_heads = D, 2
        self.fusion = build_fusion(cfg, D, D, 0)
        head = HeadConfig(type=kind, horizon=4, action_dim=3, hidden_dim=D, num_heads=2, num_inference_steps=3)
        self.head = build_head(head, D)

    def cond(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        sensor = torch.randn(2, 16, 9, generator=g)
        tok, tok_mask = self.sensor_encoder(
            {"sensor": sensor, "sensor_mask": torch.ones(2, 16, dtype=torch.bool), "has_sensor": torch.ones(2) > 0}
        )
        vl = torch.randn(2, 5, D, generator=g)
        return self.fusion(vl, torch.ones(2, 5, dtype=torch.bool), tok, tok_mask)

    def loss(self):
        cond, mask = self.cond()
        actions = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
        return self.head.loss(cond, mask, actions, torch.ones(2, 4, dtype=torch.bool), torch.Generator().manual_seed(2))


def check(kind: str, **compile_kwargs) -> None:
    from torch._dynamo.utils import counters

    eager = Parts(kind)
    for training in (False, True):
        compiled = copy.deepcopy(eager)
        compile_policy(compiled, training=training, **compile_kwargs)
        torch._dynamo.reset()
        counters.clear()
        assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoint keys unchanged
        if training:
            eager.train(), compiled.train()
            want, got = eager.loss().sum(), compiled.loss().sum()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            want.backward(), got.backward()
            for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
                if p.grad is not None:
                    torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
        else:
            eager.eval(), compiled.eval()
            with torch.inference_mode():
                want = eager.head.sample(*eager.cond(), generator=torch.Generator().manual_seed(0))
                got = compiled.head.sample(*compiled.cond(), generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] >= 2, (kind, training)  # the encoder's and the head's graphs ran


def test_compiled_graphs_equal_eager():
    """Diffusion: the sensor encoder, the denoiser's training forward and its sampling step functions."""
    check("diffusion", backend="eager")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regression", "flow"])
def test_compiled_graphs_equal_eager_other_heads(kind):
    check(kind, backend="eager")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regression", "diffusion", "flow"])
def test_inductor_compiled_equals_eager(kind):
    check(kind)
