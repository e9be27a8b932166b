"""tools/export_onnx.py on a tiny quantized Faster R-CNN R18-FPN: QDQ graph of extract_feat vs PyTorch."""
import math
import os
import os.path as osp

import cv2
import numpy as np
import pytest
import torch

from qdrop_mm.core import LSQActQuantizer, QuantLayer, calibrate_activations

from ..openmmlab.conftest import REPO, build_model_from_config

pytest.importorskip('mmdet')
pytest.importorskip('onnxruntime')

CONFIG = 'tests/openmmlab/configs/faster_rcnn_r18_coco128_tiny.py'
SHAPE = (1, 3, 128, 160)
# extract_feat outputs, onnxruntime vs PyTorch fake quant. Both compute the same integers; the FP FPN output
# convs and float summation order leave ~1e-6 relative (measured: max 6.1e-07 on this seeded model). A value
# that lands within float error of a rounding boundary can come out one step apart (seen on 1 of 10 seeds here:
# 1 of 327680 stem outputs), and on a random-weight 4-bit network every later layer inherits it; the output
# bounds apply when every quantizer agrees, otherwise the first differing quantizer must show only such cases.
MAX_REL = 1e-4
MISMATCH_FRACTION = 1e-3
BOUNDARY_CASES = 1e-4  # fraction of one quantizer's outputs allowed one step apart

def _tool(*args):
    from tools.export_onnx import main
    return main([osp.join(REPO, CONFIG), *map(str, args)])


@pytest.fixture(scope='module')
def quantized(tmp_path_factory):
    """A quantized.pth of the tiny detector: W4A4, 8-bit stem, calibrated activations, hardened random rounding."""
    from qdrop_mm.openmmlab import PTQSettings
    from qdrop_mm.openmmlab.block_plan import plan_model
    from qdrop_mm.openmmlab.checkpoint import quantized_checkpoint
    torch.manual_seed(0)
    cfg, model = build_model_from_config(CONFIG)
    settings = PTQSettings.from_cfg(cfg.ptq)
    plan_model(model, settings)
    g = torch.Generator().manual_seed(0)
    calibrate_activations(model, [torch.randn(2, *SHAPE[1:], generator=g) for _ in range(2)],
                          lambda m, b: m.extract_feat(b))
    for m in model.modules():
        if isinstance(m, QuantLayer):
            wq = m.weight_quantizer
            wq.init_rounding(m.weight)
            wq.alpha.data += torch.randn(wq.alpha.shape, generator=g)  # hard rounding that differs from nearest
            wq.set_mode('hard')
    path = tmp_path_factory.mktemp('quantized') / 'quantized.pth'
    torch.save(quantized_checkpoint(model.state_dict(), {'ptq': settings.to_dict()}), path)
    return path, model


@pytest.fixture(scope='module')
def exported(quantized, tmp_path_factory):
    path, model = quantized
    out = tmp_path_factory.mktemp('onnx') / 'frcnn.onnx'
    result = _tool('--quantized', path, '--out', out, '--input-shape', *SHAPE, '--dynamic', '--check')
    return result, model


def test_graph_has_one_qdq_per_quantizer(exported):
    result, model = exported
    n_act = sum(isinstance(m, LSQActQuantizer) for m in model.modules())
    n_w = sum(isinstance(m, QuantLayer) for m in model.modules())
    assert (n_w, n_act) == (1 + 16 + 3 + 8, 1 + 16 + 4)  # stem, 8 blocks (+3 shortcuts), FPN; acts: no FPN outputs
    assert len(result['summary'].activations) == n_act
    # a layer's own output quantizer (stem, first conv of each block, FPN laterals: 13) is written as
    # Conv -> Q -> DQ -> Clip -> Q -> DQ (fusable); the 8 residual-sum quantizers as Clip -> Q -> DQ
    layer_owned = sum(isinstance(m, QuantLayer) and isinstance(m.act_quantizer, LSQActQuantizer)
                      for m in model.modules())
    assert layer_owned == 13
    assert result['nodes']['QuantizeLinear'] == n_act + layer_owned
    # the 8-bit stem's two-sided weights would need a UINT8 zero point; its input is the (FP) image, so they
    # are written as FP32 constants: every zero point in the graph is 0 and all storage INT8 (TensorRT)
    assert result['summary'].uint8_tensors == []
    assert [w for w in result['summary'].weights if w[2] == 'float'] == [('backbone.conv1', 8, 'float')]
    assert result['nodes']['DequantizeLinear'] == n_act + layer_owned + n_w - 1
    assert result['nodes']['Clip'] == n_act  # 4-bit activations: range restricted before QuantizeLinear


def test_weight_constants_lie_on_their_grids(exported):
    from qdrop_mm.export import weight_constants
    result, model = exported
    layers = {f'model.{n}.weight_int': m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    consts = weight_constants(result['out'])
    del layers['model.backbone.conv1.weight_int']  # an FP32 constant (see above)
    assert sorted(c.name for c in consts) == sorted(layers)
    for const in consts:
        wq = layers[const.name].weight_quantizer
        z = wq.zero_point.numpy().astype(np.int32).reshape(-1, *([1] * (const.values.ndim - 1)))
        levels = const.values.astype(np.int32) + (z if const.values.dtype == np.int8 else 0)
        assert const.values.dtype == np.int8 and not const.zero_point.any()
        assert levels.min() >= 0 and levels.max() <= 2 ** wq.bits - 1, const.name
        dequant = (levels - z).astype(np.float32) * const.scale.reshape(z.shape)
        assert np.array_equal(dequant, layers[const.name].quantized_weight().numpy()), const.name


def _assert_parity(parity, agreement):
    from qdrop_mm.export import first_divergence
    first = first_divergence(agreement)
    if first is None:
        assert parity.max_rel <= MAX_REL and parity.mismatch_fraction <= MISMATCH_FRACTION, parity.describe()
    else:
        assert first.max_steps <= 1 + 1e-3 and first.differing <= max(2, BOUNDARY_CASES * first.numel), first


def test_features_match_pytorch_at_export_and_other_shapes(exported):
    from qdrop_mm.export import (MethodForward, compare_outputs, off_grid_biases, quantizer_agreement,
                                 random_input, reference_outputs, run_onnxruntime, to_qdq)
    result, _ = exported
    model = result['model']  # the tool's model, biases on the int32 grid
    assert result['parity'].numel == 256 * (32 * 40 + 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3)  # 5 FPN levels
    assert len(result['agreement']) == 21 and all(a.numel > 0 for a in result['agreement'])
    _assert_parity(result['parity'], result['agreement'])
    # onnxruntime's default session (bias rounding to int32) computes the same: the biases are on that grid
    # the biases onnxruntime rounds: layers with a quantized input and their output straight into a QuantizeLinear
    # (first conv of each of the 8 blocks, 4 FPN laterals); the second convs, shortcuts and FPN output conv keep theirs
    assert off_grid_biases(result['out']) == [] and len(result['biases']) == 8 + 4
    default_agreement = quantizer_agreement(result['out'], MethodForward(to_qdq(model)[0], 'extract_feat'),
                                            random_input(SHAPE), 'all', True)
    _assert_parity(result['parity_bias_int32'], default_agreement)
    x = random_input((2, 3, 96, 128), seed=1)
    other = compare_outputs(reference_outputs(MethodForward(model, 'extract_feat'), x),
                            run_onnxruntime(result['out'], x))
    _assert_parity(other, quantizer_agreement(result['out'], MethodForward(to_qdq(model)[0], 'extract_feat'), x))


def test_real_image_check(quantized, coco128, tmp_path, capsys):
    path, _ = quantized
    image = osp.join(coco128, 'val2017', sorted(os.listdir(osp.join(coco128, 'val2017')))[0])
    result = _tool('--quantized', path, '--out', tmp_path / 'img.onnx', '--check-image', image)
    _assert_parity(result['parity'], result['agreement'])
    h, w = cv2.imread(image).shape[:2]
    factor = min(160 / max(h, w), 128 / min(h, w))  # Resize scale=(160, 128), keep_ratio, then Pad to 32
    padded = [math.ceil(int(d * factor + 0.5) / 32) * 32 for d in (h, w)]
    assert f'input [1, 3, {padded[0]}, {padded[1]}]' in capsys.readouterr().out  # real COCO 640x427: [128, 160]


@pytest.mark.parametrize('args,message', [
    (['--quantized', 'missing.pth'], '--quantized file not found: missing.pth'),
    (['--input-shape', 1, 3, 0, 64], '--input-shape must be 4 positive integers'),
    (['--input-shape', 1, 1, 64, 64], '--input-shape: C must be 3'),
    (['--opset', 11], '--opset must be >= 13'),
    (['--check-image', 'nope.jpg'], '--check-image file not found: nope.jpg'),
    (['--out', '/nonexistent-dir/x.onnx'], '--out: folder /nonexistent-dir does not exist'),
    (['--nms'], '--nms needs --whole'),
    (['--whole', '--nms', '--dynamic'], '--nms needs a static input shape'),
    (['--whole', '--nms', '--input-shape', 2, 3, 64, 64], '--nms takes one image: --input-shape N must be 1, got 2'),
])
def test_bad_arguments_stop_with_one_line(quantized, args, message):
    path, _ = quantized
    argv = args if args[0] == '--quantized' else ['--quantized', path, *args]
    with pytest.raises(SystemExit, match='^error: ' + message.replace('[', r'\[')) as exc:
        _tool(*argv)
    assert '\n' not in str(exc.value)


def test_checkpoint_of_another_model_is_refused(quantized, tmp_path):
    path, _ = quantized
    saved = torch.load(path, weights_only=True)
    saved['state_dict'] = {k: v for k, v in saved['state_dict'].items() if 'layer4' not in k}
    torch.save(saved, tmp_path / 'partial.pth')
    with pytest.raises(SystemExit, match=r'^error: .*partial\.pth does not fit this model: \d+ missing keys'):
        _tool('--quantized', tmp_path / 'partial.pth', '--out', tmp_path / 'x.onnx')
    with pytest.raises(SystemExit, match=r'^error: .*quantized\.pth does not fit this model: \d+ tensors of another '
                                         r'shape \(e\.g\. size mismatch for backbone\.'):
        _tool('--quantized', path, '--out', tmp_path / 'x.onnx', '--cfg-options', 'model.backbone.depth=50',
              'model.neck.in_channels=[256,512,1024,2048]')
    torch.save({'weights': 1}, tmp_path / 'other.pth')
    with pytest.raises(SystemExit, match=r'not a qdrop_mm quantized checkpoint'):
        _tool('--quantized', tmp_path / 'other.pth', '--out', tmp_path / 'x.onnx')
