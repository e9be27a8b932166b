"""Biases on the int32 grid: onnxruntime's default session (which rounds them, and fuses integer convs) then
computes what the PyTorch fake-quant model computes."""
import copy

import numpy as np
import pytest
import torch

from qdrop_mm.core import QuantLayer
from qdrop_mm.export import (MethodForward, compare_outputs, export_onnx, first_divergence, grid_bias,
                             off_grid_biases, prepare_export, quantizer_agreement, reference_outputs,
                             round_biases_to_int32_grid, run_onnxruntime, to_qdq)

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

MAX_REL = 1e-5  # float summation order only (every quantizer agrees)


def test_grid_bias_is_a_fixed_point_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(64, generator=g)
    s_x = torch.tensor(0.0371)
    s_w = torch.rand(64, generator=g) * 0.01 + 1e-3
    moved = grid_bias(bias, s_x, s_w)
    step = s_x * s_w
    k = moved / step
    assert torch.equal(k.round(), torch.round(bias / step))  # the integer onnxruntime computes from b
    assert (k - k.round()).abs().max() < 1e-3  # on the grid
    assert ((moved - bias).abs() / step).max() <= 0.5 + 1e-4
    assert torch.equal(grid_bias(moved, s_x, s_w), moved)  # rounding again changes nothing
    assert not torch.equal(moved, bias)


@pytest.fixture(scope='module')
def toy_pair(hardened_toy, tmp_path_factory):
    """(model with float biases, its graph), (model with int32-grid biases, its graph)."""
    net, batches = hardened_toy
    folder = tmp_path_factory.mktemp('bias')
    float_net, grid_net = copy.deepcopy(net), copy.deepcopy(net)
    float_path, grid_path = str(folder / 'float.onnx'), str(folder / 'grid.onnx')
    export_onnx(MethodForward(to_qdq(float_net)[0], 'features'), batches[0], float_path)
    prepared = prepare_export(grid_net, lambda m: m.features(batches[0]))
    export_onnx(MethodForward(prepared.module, 'features'), batches[0], grid_path)
    return (float_net, float_path), (grid_net, grid_path, prepared), batches


def test_requantized_layers_get_grid_biases(toy_pair):
    (float_net, float_path), (grid_net, grid_path, prepared), _ = toy_pair
    # ToyNet: stem (input = image, not quantized), block1 conv1/conv2, block2 conv1/conv2/shortcut. Only the
    # first conv of each block has a quantized input AND its output straight into a QuantizeLinear (conv2 and the
    # shortcut are summed in FP32 first): those are the biases onnxruntime rounds
    assert sorted(b.name for b in prepared.biases) == ['block1.branch.0', 'block2.branch.0']
    assert all(0 < b.max_change_steps <= 0.5 + 1e-4 for b in prepared.biases)
    for name in ('stem', 'block1.branch.1', 'block2.branch.1', 'block2.shortcut'):
        assert torch.equal(grid_net.get_submodule(name).bias, float_net.get_submodule(name).bias), name
    assert len(off_grid_biases(float_path)) == 2 and off_grid_biases(grid_path) == []
    again = round_biases_to_int32_grid(grid_net, lambda m: m.features(torch.zeros(1, 3, 16, 16)))
    assert [b.max_change for b in again] == [0.0] * 2
    # the 8-bit stem's weights need a UINT8 zero point; its input is the image, so they become FP32 constants
    assert prepared.float_weights == ['stem'] and prepared.summary.uint8_tensors == []


def test_default_session_matches_pytorch_only_with_grid_biases(toy_pair):
    (float_net, float_path), (grid_net, grid_path, prepared), batches = toy_pair
    worst_float = 0.0
    for b in batches:
        ref = reference_outputs(MethodForward(grid_net, 'features'), b)
        for quantize_bias in (False, True):  # without / with onnxruntime's bias rounding (its default)
            parity = compare_outputs(ref, run_onnxruntime(grid_path, b, 'all', quantize_bias))
            first = first_divergence(quantizer_agreement(grid_path, MethodForward(prepared.module, 'features'), b,
                                                         'all', quantize_bias))
            if first is None:
                assert parity.max_rel <= MAX_REL, parity.describe()
            else:
                assert first.max_steps <= 1 + 1e-3 and first.differing <= 2, first
        float_ref = reference_outputs(MethodForward(float_net, 'features'), b)
        worst_float = max(worst_float, compare_outputs(float_ref, run_onnxruntime(float_path, b, 'all', True)).max_rel)
    # float biases: the default session computes another model (the difference this module removes)
    assert worst_float > 100 * MAX_REL


def test_default_session_rounds_float_biases_exactly_as_we_do(toy_pair):
    # the float-bias graph in onnxruntime's default session (which rounds the biases itself) computes the model
    # whose biases round_biases_to_int32_grid moved: same layers, same integers
    (_, float_path), (grid_net, _, prepared), batches = toy_pair
    for b in batches:
        ref = reference_outputs(MethodForward(grid_net, 'features'), b)
        parity = compare_outputs(ref, run_onnxruntime(float_path, b, 'all', True))
        first = first_divergence(quantizer_agreement(float_path, MethodForward(prepared.module, 'features'), b,
                                                     'all', True))
        if first is None:
            assert parity.max_rel <= MAX_REL, parity.describe()
        else:
            assert first.max_steps <= 1 + 1e-3 and first.differing <= 2, first


def test_zero_points_are_int8_zero_throughout(toy_pair):
    import onnx
    from onnx import numpy_helper
    _, (_, grid_path, _), _ = toy_pair
    graph = onnx.load(grid_path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    zps = [inits[n.input[2]] for n in graph.node if n.op_type in ('QuantizeLinear', 'DequantizeLinear')]
    assert len(zps) == 8 + 8 + 5  # 8 Q and 8 DQ for 5 activation quantizers (3 written twice), 5 weight DQ
    assert all(z.dtype == np.int8 and not z.any() for z in zps)


def test_uint8_activation_storage_gives_the_same_values(toy_pair, tmp_path):
    _, (grid_net, grid_path, _), batches = toy_pair
    prepared = prepare_export(grid_net, lambda m: m.features(batches[0]), activation_storage='uint8')
    path = str(tmp_path / 'u8.onnx')
    export_onnx(MethodForward(prepared.module, 'features'), batches[0], path)
    assert sorted({s for _, _, s in prepared.summary.activations}) == ['uint8']
    assert all(isinstance(m, QuantLayer) is False for m in prepared.module.modules())
    for b in batches:
        assert np.array_equal(run_onnxruntime(path, b, 'disable')[0], run_onnxruntime(grid_path, b, 'disable')[0])
