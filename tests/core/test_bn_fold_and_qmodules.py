import copy

import pytest
import torch
from torch import nn

from qdrop_mm.core import QuantLayer, QuantResidual, fold_bn, quant_state
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, toy_forward


def _bn(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.running_mean = torch.randn(c, generator=g)
    bn.running_var = torch.rand(c, generator=g) + 0.1
    bn.weight.data = torch.randn(c, generator=g)
    bn.bias.data = torch.randn(c, generator=g)
    return bn.eval()


@pytest.mark.parametrize('bias', [False, True])
def test_fold_bn_preserves_conv_outputs(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=bias)
    bn = _bn(7)
    x = torch.randn(2, 5, 9, 9)
    w, b = fold_bn(conv.weight, conv.bias, bn)
    ref = bn(conv(x))
    out = nn.functional.conv2d(x, w, b, padding=1)
    assert (out - ref).abs().max().item() < 1e-5


def test_quant_layer_fp_mode_matches_module_and_quant_mode_differs():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), _bn(6)
    ql = QuantLayer(conv, 4, bn=bn, activation=nn.ReLU(), a_bits=4)
    x = torch.randn(3, 4, 11, 11)
    ref = torch.relu(bn(conv(x)))
    with quant_state(ql, weight=False, act=False):
        assert (ql(x) - ref).abs().max().item() < 1e-5
    ql.act_quantizer.start_observing()
    with quant_state(ql, weight=False, act=False):
        ql(x)
    ql.act_quantizer.finish_observing()
    assert (ql(x) - ref).abs().max().item() > 1e-3


def test_linear_and_type_checks():
    lin = nn.Linear(8, 3)
    ql = QuantLayer(lin, 8)
    x = torch.randn(5, 8)
    with quant_state(ql, weight=False):
        assert torch.allclose(ql(x), lin(x), atol=1e-6)
    with pytest.raises(TypeError, match='Conv2d or nn.Linear'):
        QuantLayer(nn.ReLU(), 4)
    with pytest.raises(ValueError, match='padding_mode'):
        QuantLayer(nn.Conv2d(2, 2, 3, padding=1, padding_mode='reflect'), 4)


def test_toy_network_fp_equivalence_after_wrapping():
    net, batches = make_toy_setup(0)
    ref = copy.deepcopy(net)
    quantize_toy_net(net, 4, 4)
    assert isinstance(net.block2, QuantResidual)
    with quant_state(net, weight=False, act=False), torch.no_grad():
        for b in batches:
            assert (toy_forward(net, b) - ref.features(b)).abs().max().item() < 1e-5


def test_state_dict_roundtrip_reproduces_outputs():
    net, batches = make_toy_setup(0)
    fresh = copy.deepcopy(net)
    quantize_toy_net(net, 4, 4)
    from qdrop_mm.core import calibrate_activations
    calibrate_activations(net, batches[:2], toy_forward)
    quantize_toy_net(fresh, 4, 4)
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(toy_forward(fresh, batches[0]), toy_forward(net, batches[0]))
