"""The packed inference kernels (`models/packed.py`) compute the functions of the nn modules they are built from:
attention with and without padded keys, encoder and decoder layers, batch 1 and batch 3; a `Memory` of a
concatenation is the concatenation of memories; the cache follows every change of the parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sensorvla.config import HeadConfig
from sensorvla.models.heads import build_head
from sensorvla.models.heads.base import decode
from sensorvla.models.packed import (
    Memory,
    PackedAttention,
    PackedDecoder,
    PackedEncoderLayer,
    key_bias,
    packed,
    unpack,
)

D, HEADS = 32, 4


def masks(b: int, n: int, padded: bool) -> torch.Tensor:
    m = torch.ones(b, n, dtype=torch.bool)
    if padded:
        m[-1, n // 2 :] = False  # the last sample is shorter
    return m


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_equals_multihead_attention(b, padded):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    x, mem = torch.randn(b, 5, D), torch.randn(b, 9, D)
    m = masks(b, 9, padded)
    with torch.no_grad():
        ref, _ = mha(x, mem, mem, key_padding_mask=~m, need_weights=False)
        ref_self, _ = mha(x, x, x, need_weights=False)
        p = PackedAttention(mha)
        got = p.attend(p.query(x), *p.keys_values(mem), key_bias(m, HEADS), b)
        got_self = p.self_attend(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_self, ref_self, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_layer_equals_torch(b, padded):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, 4 * D, 0.1, activation="gelu", batch_first=True, norm_first=True)
    layer.eval()
    x = torch.randn(b, 7, D)
    m = masks(b, 7, padded)
    with torch.no_grad():
        ref = layer(x, src_key_padding_mask=~m)
        got = PackedEncoderLayer(layer)(x, key_bias(m, HEADS))
    keep = m[..., None].expand_as(ref)  # torch's fast path leaves padded rows' outputs unspecified
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_over_memory_equals_torch_decoder(b, padded):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, HEADS, 4 * D, 0.1, activation="gelu", batch_first=True, norm_first=True)
    dec = nn.TransformerDecoder(layer, 2).eval()
    tgt, mem = torch.randn(b, 6, D), torch.randn(b, 11, D)
    m = masks(b, 11, padded)
    if padded:
        mem[-1, 6:] = 1e4  # padded tokens must not matter, even with huge values
    with torch.no_grad():
        ref = dec(tgt, mem, memory_key_padding_mask=~m)
        pd = PackedDecoder(dec)
        got = pd(tgt, pd.memory(mem, m))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, decode(dec, tgt, mem, m).detach(), atol=1e-5, rtol=1e-5)


def test_memory_of_a_concatenation_is_the_concatenation_of_memories():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, HEADS, 4 * D, batch_first=True, norm_first=True)
    pd = PackedDecoder(nn.TransformerDecoder(layer, 2).eval())
    a, b = torch.randn(2, 7, D), torch.randn(2, 3, D)
    ma, mb = masks(2, 7, True), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        whole = pd.memory(torch.cat([a, b], 1), torch.cat([ma, mb], 1))
        parts = pd.memory(a, ma).cat(pd.memory(b, mb))
    assert isinstance(parts, Memory) and torch.equal(parts.mask, whole.mask)
    for x, y in zip(parts.keys + parts.values, whole.keys + whole.values, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert whole.attn_mask is not None and pd.memory(b, mb).attn_mask is None


@pytest.mark.parametrize("padded", [False, True])
def test_regression_head_samples_its_training_prediction(padded):
    torch.manual_seed(0)
    head = build_head(HeadConfig(horizon=6, action_dim=4, hidden_dim=D, num_heads=HEADS), 24).eval()
    cond, m = torch.randn(3, 11, 24), masks(3, 11, padded)
    with torch.no_grad():
        ref = head.predict(cond, m)  # the training path (decode over nn modules)
    with torch.inference_mode():
        got = head.sample(cond, m)  # the packed path
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_pack_is_cached_and_rebuilt_when_a_parameter_changes():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, 4 * D, batch_first=True, norm_first=True)
    x = torch.randn(1, 5, D)
    first = packed(layer, PackedEncoderLayer)
    assert packed(layer, PackedEncoderLayer) is first  # unchanged parameters: the same pack
    assert not any("packed" in k for k in layer.state_dict())  # not a submodule, not a checkpoint key

    opt = torch.optim.SGD(layer.parameters(), lr=0.1)  # an optimizer step changes values in place
    layer(x).square().sum().backward()
    opt.step()
    second = packed(layer, PackedEncoderLayer)
    assert second is not first
    with torch.no_grad():
        torch.testing.assert_close(second(x), layer.eval()(x), atol=1e-5, rtol=1e-5)

    other = copy.deepcopy(layer)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    layer.load_state_dict(other.state_dict())  # copied in place
    third = packed(layer, PackedEncoderLayer)
    assert third is not second
    with torch.no_grad():
        torch.testing.assert_close(third(x), other.eval()(x), atol=1e-5, rtol=1e-5)

    layer.to(torch.float64).to(torch.float32)  # new storage
    assert packed(layer, PackedEncoderLayer) is not third
    unpack(layer)
    assert "_packed" not in layer.__dict__


def test_packed_attention_refuses_what_it_does_not_pack():
    with pytest.raises(ValueError, match="batch-first"):
        PackedAttention(nn.MultiheadAttention(D, HEADS))
    with pytest.raises(ValueError, match="pre-norm"):
        PackedEncoderLayer(nn.TransformerEncoderLayer(D, HEADS, batch_first=True))


@pytest.mark.parametrize("depth", [32, 600])  # dense conv matrices, and the unfolded convs of a deep OCT profile
def test_packed_sensor_encoder_equals_the_modules(depth):
    from sensorvla.config import SensorConfig
    from sensorvla.models.sensor_encoder import PackedSensorEncoder, SensorEncoder

    torch.manual_seed(0)
    enc = SensorEncoder(SensorConfig(dropout=0.0, hidden_dim=D, num_heads=HEADS), 16, 1 + depth).eval()
    pack = packed(enc, PackedSensorEncoder)
    kinds = [kind for kind, _ in pack.ascan.layers if kind in ("dense", "unfold")]
    assert kinds == {32: ["dense"] * 3, 600: ["unfold"] * 3}[depth]  # 600 x 16 x 300 entries > DENSE_CONV_MAX
    x = torch.randn(3, 16, 1 + depth)
    m, has = masks(3, 16, True), torch.tensor([True, False, True])
    with torch.no_grad():  # grad off but not inference mode: the modules
        ref, _ = enc(x, m, has)
    with torch.inference_mode():
        got, _ = enc(x, m, has)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
