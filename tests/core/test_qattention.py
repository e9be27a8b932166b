"""QuantMultiheadAttention computes nn.MultiheadAttention with separate projections; QuantLayer's FP norm and input quantizer."""
import pytest
import torch
from torch import nn

from qdrop_mm.core import QuantLayer, quant_state
from qdrop_mm.core.qattention import QuantMultiheadAttention


def _plain(_name, linear):
    return QuantLayer(linear, 8, w_observer='minmax')


@pytest.mark.parametrize('batch_first', [False, True])
def test_matches_torch_attention_with_masks(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kv = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    attn_mask = torch.randn(5, 7)
    quant = QuantMultiheadAttention(mha, _plain)
    with torch.no_grad(), quant_state(quant, weight=False, act=False):
        for kwargs in ({}, dict(key_padding_mask=pad), dict(attn_mask=attn_mask, key_padding_mask=pad)):
            ref = mha(q, kv, kv, **kwargs)[0]
            out, weights = quant(q, kv, kv, **kwargs)
            assert weights is None and out.shape == ref.shape
            assert torch.allclose(out, ref, atol=1e-5), kwargs
    assert [n for n, _ in quant.named_children()] == ['q_proj', 'k_proj', 'v_proj', 'out_proj']


def test_quant_layer_keeps_norm_fp_and_quantizes_input():
    torch.manual_seed(0)
    conv, gn = nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8)
    layer = QuantLayer(conv, 4, norm=gn, activation=nn.ReLU(), a_bits=4, in_a_bits=4, w_observer='minmax')
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad(), quant_state(layer, weight=False, act=False):
        assert torch.allclose(layer(x), torch.relu(gn(conv(x))), atol=1e-6)
    assert layer.input_quantizer.bits == 4 and not any(p.requires_grad for p in layer.norm.parameters())
    assert {'norm.weight', 'norm.bias', 'input_quantizer.scale'} <= set(layer.state_dict())
