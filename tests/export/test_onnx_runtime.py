"""The exported QDQ graph in onnxruntime: node counts, integer weights on the b-bit grid, parity with PyTorch."""
import numpy as np
import pytest
import torch
from torch import nn

from qdrop_mm.core import LSQActQuantizer, QuantLayer
from qdrop_mm.export import (MethodForward, QDQActivation, QDQOptions, compare_outputs, export_onnx, first_divergence,
                             qdq_node_counts, quantizer_agreement, reference_outputs, run_onnxruntime, to_qdq,
                             weight_constants)

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

# Toy network features, onnxruntime vs PyTorch fake quant. Both compute the same integers (measured here: max
# error 0). An element can differ only where float summation order inside a conv moves a value across a
# rounding boundary: then it is one step off and later layers inherit it, so the feature bounds apply when all
# quantizers agree, and otherwise the first differing quantizer may show only such one-step cases.
TOY_MAX_REL = 1e-5
TOY_MISMATCH_FRACTION = 1e-3
BOUNDARY_CASES = 1e-3

class _Single(nn.Module):
    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.q = q

    def forward(self, x):
        return self.q(x)


@pytest.mark.parametrize('bits,zero_point', [(2, 1), (4, 0), (4, 9), (8, 0), (8, 128)])
def test_single_activation_qdq_is_exact_in_onnxruntime(tmp_path, bits, zero_point):
    q = LSQActQuantizer(bits)
    q.set_range(torch.tensor(0.0371), torch.tensor(float(zero_point)))
    qmax = 2 ** bits - 1
    levels = torch.arange(-zero_point - 3, qmax - zero_point + 4, dtype=torch.float32)
    x = torch.cat([levels, levels + 0.5, torch.linspace(-zero_point - 5, qmax - zero_point + 5, 3001)]) * 0.0371
    x = x.reshape(1, 1, 1, -1)
    path = str(tmp_path / 'q.onnx')
    export_onnx(_Single(QDQActivation.from_quantizer(q)), x, path)
    counts = qdq_node_counts(path)
    assert counts['QuantizeLinear'] == counts['DequantizeLinear'] == 1
    assert counts.get('Clip', 0) == (0 if (bits, zero_point) in ((8, 0), (8, 128)) else 1)
    for level in ('disable', 'all'):
        out = run_onnxruntime(path, x, level)[0]
        assert np.array_equal(out, q(x).numpy()), level


@pytest.fixture(scope='module')
def exported_toy(hardened_toy, tmp_path_factory):
    net, batches = hardened_toy
    exported, _ = to_qdq(net)
    path = str(tmp_path_factory.mktemp('toy') / 'toy.onnx')
    export_onnx(MethodForward(exported, 'features'), batches[0], path)
    return net, batches, exported, path


def test_toy_graph_has_one_qdq_per_quantizer(exported_toy, tmp_path):
    net, batches, _, path = exported_toy
    n_act = sum(isinstance(m, LSQActQuantizer) for m in net.modules())
    n_w = sum(isinstance(m, QuantLayer) for m in net.modules())
    # stem and each block's first conv own their output quantizer: Conv -> Q -> DQ -> Clip -> Q -> DQ, so the
    # first QuantizeLinear follows the Conv (fusable); the two residual-sum quantizers are Clip -> Q -> DQ
    owned = sum(isinstance(m, QuantLayer) and isinstance(m.act_quantizer, LSQActQuantizer) for m in net.modules())
    counts = qdq_node_counts(path)
    assert (n_act, owned) == (5, 3)
    assert counts['QuantizeLinear'] == n_act + owned
    assert counts['DequantizeLinear'] == n_act + owned + n_w
    assert counts['Clip'] == 5  # every 4-bit activation needs its range restricted
    assert counts['Conv'] == n_w
    # the other placement (activation -> Clip -> Q -> DQ) computes the same values
    plain = str(tmp_path / 'plain.onnx')
    export_onnx(MethodForward(to_qdq(net, QDQOptions(requantize=False))[0], 'features'), batches[0], plain)
    assert qdq_node_counts(plain)['QuantizeLinear'] == n_act
    for b in batches:
        assert np.array_equal(run_onnxruntime(plain, b, 'disable')[0], run_onnxruntime(path, b, 'disable')[0])


def test_toy_weight_constants_lie_on_the_grid(exported_toy):
    net, _, _, path = exported_toy
    layers = {f'model.{name}.weight_int': m for name, m in net.named_modules() if isinstance(m, QuantLayer)}
    consts = weight_constants(path)
    assert sorted(c.name for c in consts) == sorted(layers)
    for const in consts:
        layer = layers[const.name]
        wq = layer.weight_quantizer
        assert const.axis == 0 and const.values.shape == tuple(layer.weight.shape)
        assert np.array_equal(const.scale, wq.scale.numpy())
        if wq.bits < 8:
            assert const.values.dtype == np.int8 and not const.zero_point.any()
            levels = const.values.astype(np.int32) + wq.zero_point.numpy().astype(np.int32).reshape(-1, 1, 1, 1)
        else:
            assert const.values.dtype == np.uint8
            levels = const.values.astype(np.int32)
        assert levels.min() >= 0 and levels.max() <= 2 ** wq.bits - 1
        ref = (layer.quantized_weight() / wq.scale.reshape(-1, 1, 1, 1) + wq.zero_point.reshape(-1, 1, 1, 1))
        assert np.array_equal(levels, ref.round().int().numpy())
    assert sorted(layer.weight_quantizer.bits for layer in layers.values()) == [4, 4, 4, 4, 4, 8]


@pytest.mark.parametrize('level', ['disable', 'all'])
def test_toy_features_match_pytorch_in_onnxruntime(exported_toy, level):
    net, batches, exported, path = exported_toy
    for b in batches[:2]:
        parity = compare_outputs(reference_outputs(MethodForward(net, 'features'), b), run_onnxruntime(path, b, level))
        agreement = quantizer_agreement(path, MethodForward(exported, 'features'), b, level)
        assert [a.name for a in agreement] == ['model.stem.act_quantizer', 'model.block1.branch.0.act_quantizer',
                                               'model.block1.act_quantizer', 'model.block2.branch.0.act_quantizer',
                                               'model.block2.act_quantizer']
        first = first_divergence(agreement)
        if first is None:
            assert parity.max_rel <= TOY_MAX_REL and parity.mismatch_fraction <= TOY_MISMATCH_FRACTION, \
                parity.describe()
        else:
            assert first.max_steps <= 1 + 1e-3 and first.differing <= max(2, BOUNDARY_CASES * first.numel), first


def test_linear_layer_exports_as_dequantized_gemm(tmp_path):
    torch.manual_seed(0)
    layer = QuantLayer(nn.Linear(12, 5), 3, activation=nn.ReLU(), a_bits=2, w_observer='minmax', a_observer='minmax')
    x = torch.randn(64, 12)
    layer.act_quantizer.start_observing()
    layer(x)
    layer.act_quantizer.finish_observing()
    exported, summary = to_qdq(layer)
    assert summary.weights == [('', 3, 'int8')] and summary.activations == [('act_quantizer', 2, 'int8')]
    path = str(tmp_path / 'linear.onnx')
    export_onnx(exported, x, path)
    counts = qdq_node_counts(path)
    # Gemm -> Q -> DQ -> Clip(ReLU and the 2-bit range) -> Q -> DQ
    assert counts['Gemm'] == 1 and counts['QuantizeLinear'] == 2 and counts['DequantizeLinear'] == 3
    assert counts['Clip'] == 1 and 'Relu' not in counts
    (const,) = weight_constants(path)
    assert const.values.dtype == np.int8 and np.ptp(const.values, axis=1).max() <= 7
    out = run_onnxruntime(path, x)[0]
    assert np.array_equal(out, layer(x).detach().numpy())
    assert len(np.unique(np.round(out / float(layer.act_quantizer.scale)))) <= 4


def test_qwt_compensated_units_export_with_fp_compensation_convs(tmp_path):
    """RTN (nearest rounding) + QwT: each compensation is a plain FP 1x1 conv; the moved output quantizers stay QDQ."""
    qwt = pytest.importorskip('qdrop_mm.core.qwt')
    from qdrop_mm.core import build_method, run_ptq
    from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, toy_forward
    net, batches = make_toy_setup(seed=1, num_batches=2, batch_size=2, size=16, width=8)
    units = quantize_toy_net(net, w_bits=4, a_bits=4)
    run_ptq(net, units, batches, toy_forward, build_method('rtn'))
    wrappers = qwt.wrap_units(net, [u.module for u in units])
    g = torch.Generator().manual_seed(0)
    for w in wrappers[1:]:
        first, last = w.unit.branch[0], w.unit.branch[-1]
        w.install(torch.randn(last.weight.shape[0], first.weight.shape[1], generator=g) * 0.1,
                  torch.randn(last.weight.shape[0], generator=g) * 0.1, first.stride)
    exported, summary = to_qdq(net)
    assert len(summary.activations) == sum(isinstance(m, LSQActQuantizer) for m in net.modules()) == 5
    path = str(tmp_path / 'qwt.onnx')
    export_onnx(MethodForward(exported, 'features'), batches[0], path)
    counts = qdq_node_counts(path)
    owned = sum(isinstance(m, QuantLayer) and isinstance(m.act_quantizer, LSQActQuantizer) for m in net.modules())
    assert owned >= 1  # layers still owning their output quantizer get a second QuantizeLinear after the conv
    assert counts['QuantizeLinear'] == 5 + owned and counts['DequantizeLinear'] == 5 + owned + 6
    assert counts['Conv'] == 6 + 2
    for b in batches:
        parity = compare_outputs(reference_outputs(MethodForward(net, 'features'), b), run_onnxruntime(path, b))
        first = first_divergence(quantizer_agreement(path, MethodForward(exported, 'features'), b))
        if first is None:
            assert parity.max_rel <= TOY_MAX_REL, parity.describe()
        else:
            assert first.max_steps <= 1 + 1e-3 and first.differing <= max(2, BOUNDARY_CASES * first.numel), first
