"""Export form of the quantizers (PyTorch only): the QDQ rewrite computes exactly what fake quantization does."""
import copy

import pytest
import torch
from torch import nn

from qdrop_mm.core import LSQActQuantizer, QuantLayer, weight_quantizers
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net
from qdrop_mm.export import QDQActivation, QDQLayer, integer_weight, to_qdq


def _calibrated(bits: int, scale: float, zero_point: int) -> LSQActQuantizer:
    q = LSQActQuantizer(bits)
    q.set_range(torch.tensor(scale), torch.tensor(float(zero_point)))
    return q


def _grid_probe(scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """Values far outside the range, on every level, on every tie between levels, and random ones."""
    levels = torch.arange(-zero_point - 3, qmax - zero_point + 4, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rand = (torch.rand(4000, generator=g) * (qmax + 8) - zero_point - 4) * scale
    return torch.cat([levels * scale, (levels + 0.5) * scale, rand, torch.tensor([-1e6, 1e6])])


@pytest.mark.parametrize('bits,zero_point', [(2, 0), (2, 3), (4, 0), (4, 7), (4, 15), (7, 127), (8, 0), (8, 128),
                                             (8, 200)])
def test_activation_qdq_equals_fake_quant_exactly(bits, zero_point):
    q = _calibrated(bits, 0.0371, zero_point)
    x = _grid_probe(0.0371, zero_point, 2 ** bits - 1)
    qdq = QDQActivation.from_quantizer(q)
    assert torch.equal(qdq(x), q(x))
    levels = torch.unique(torch.round(qdq(x) / 0.0371))
    assert levels.min() == -zero_point and levels.max() == 2 ** bits - 1 - zero_point
    assert len(levels) == 2 ** bits


@pytest.mark.parametrize('bits,zero_point,storage,clip', [(2, 1, 'int8', True), (4, 0, 'int8', True),
                                                          (7, 100, 'int8', True), (8, 128, 'int8', False),
                                                          (8, 0, 'uint8', False), (8, 37, 'uint8', False)])
def test_activation_storage_choice(bits, zero_point, storage, clip):
    qdq = QDQActivation.from_quantizer(_calibrated(bits, 0.1, zero_point))
    assert (qdq.storage, qdq.clip) == (storage, clip)
    assert int(qdq.zero_point) == (0 if storage == 'int8' else zero_point)
    if clip:
        assert qdq.clip_lo.item() == pytest.approx(-zero_point * 0.1)
        assert qdq.clip_hi.item() == pytest.approx((2 ** bits - 1 - zero_point) * 0.1)


def _layer(bits: int, two_sided: bool = True, out_ch: int = 8) -> QuantLayer:
    torch.manual_seed(bits)
    conv = nn.Conv2d(4, out_ch, 3, padding=1)
    if not two_sided:
        conv.weight.data = conv.weight.data.abs()
    layer = QuantLayer(conv, bits, a_bits=None, w_observer='minmax')
    layer.weight_quantizer.init_rounding(layer.weight)
    torch.nn.init.normal_(layer.weight_quantizer.alpha)
    layer.weight_quantizer.set_mode('hard')
    return layer


@pytest.mark.parametrize('bits', [2, 3, 4, 7])
def test_low_bit_weights_are_int8_offsets_on_the_grid(bits):
    layer = _layer(bits)
    w_int, scale, zp = integer_weight(layer)
    assert w_int.dtype == torch.int8 and not zp.any()
    levels = w_int.float() + layer.weight_quantizer.zero_point.reshape(-1, 1, 1, 1)
    assert levels.min() >= 0 and levels.max() <= 2 ** bits - 1
    assert levels.amax(dim=(1, 2, 3)).eq(2 ** bits - 1).any()
    qdq = QDQLayer(layer)
    assert torch.equal(qdq.dequantized_weight(), layer.quantized_weight())
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(qdq(x), layer(x))


def test_eight_bit_weights_fall_back_to_uint8_with_zero_point():
    layer = _layer(8)
    w_int, _, zp = integer_weight(layer)
    assert w_int.dtype == torch.uint8 and torch.equal(zp.float(), layer.weight_quantizer.zero_point)
    assert w_int.max() == 255 and w_int.min() == 0
    assert torch.equal(QDQLayer(layer).dequantized_weight(), layer.quantized_weight())


@pytest.mark.parametrize('step,dtype', [(1 / 100, torch.int8), (1 / 127, torch.int8), (1 / 128, torch.uint8)])
def test_eight_bit_weights_are_int8_when_offsets_fit_tensorrt_weight_range(step, dtype):
    conv = nn.Conv2d(2, 3, 1)
    conv.weight.data = torch.linspace(-1.0, 1.0, 6).reshape(3, 2, 1, 1)
    layer = QuantLayer(conv, 8, w_observer='minmax')
    layer.weight_quantizer.scale.fill_(step)
    layer.weight_quantizer.zero_point.fill_(128)
    w_int, _, zp = integer_weight(layer)
    lowest_offset = -round(1 / step)  # the weight -1.0 in steps below the zero point
    assert w_int.dtype == dtype
    assert w_int.int().min() == (lowest_offset if dtype == torch.int8 else 128 + lowest_offset)
    assert torch.equal(QDQLayer(layer).dequantized_weight(), layer.quantized_weight())


def test_toy_network_export_form_matches_bit_for_bit(hardened_toy):
    net, batches = hardened_toy
    assert all(q.mode == 'hard' for q in weight_quantizers(net))
    exported, summary = to_qdq(net)
    n_act = sum(isinstance(m, LSQActQuantizer) for m in net.modules())
    n_w = sum(isinstance(m, QuantLayer) for m in net.modules())
    assert len(summary.activations) == n_act == 5 and len(summary.weights) == n_w == 6
    assert sum(isinstance(m, QDQActivation) for m in exported.modules()) == n_act
    assert not any(isinstance(m, (LSQActQuantizer, QuantLayer)) for m in exported.modules())
    assert summary.uint8_tensors == ['stem']  # the 8-bit stem's weights: two-sided, do not fit INT8
    with torch.no_grad():
        for b in batches:
            assert torch.equal(exported.features(b), net.features(b))
    assert any(isinstance(m, QuantLayer) for m in net.modules())  # the original is untouched


def test_refuses_soft_rounding_uncalibrated_and_dropping(hardened_toy):
    net, _ = hardened_toy
    soft = copy.deepcopy(net)
    soft.block1.branch[0].weight_quantizer.set_mode('soft')
    with pytest.raises(ValueError, match=r'block1\.branch\.0: weight rounding is still soft'):
        to_qdq(soft)
    dropping = copy.deepcopy(net)
    dropping.block2.act_quantizer.drop_prob = 0.5
    with pytest.raises(ValueError, match=r'block2\.act_quantizer: .*drop_prob=0.5'):
        to_qdq(dropping)
    fresh, _ = make_toy_setup(seed=0, num_batches=1, batch_size=1, size=8, width=4)
    quantize_toy_net(fresh, 4, 4)
    with pytest.raises(ValueError, match='not calibrated'):
        to_qdq(fresh)


def test_fp_norm_and_input_quantizer_are_exported():
    torch.manual_seed(0)
    layer = QuantLayer(nn.Conv2d(4, 8, 3, padding=1), 4, norm=nn.GroupNorm(2, 8), activation=nn.ReLU(),
                       a_bits=4, in_a_bits=4, w_observer='minmax')
    layer.weight_quantizer.init_rounding(layer.weight)
    layer.weight_quantizer.set_mode('hard')
    layer.input_quantizer = _calibrated(4, 0.05, 8)
    layer.act_quantizer = _calibrated(4, 0.1, 0)
    exported, summary = to_qdq(layer)
    assert isinstance(exported.norm, nn.GroupNorm) and isinstance(exported.input_quantizer, QDQActivation)
    assert [name for name, _, _ in summary.activations] == ['input_quantizer', 'act_quantizer']
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(exported(x), layer(x), atol=1e-6)
