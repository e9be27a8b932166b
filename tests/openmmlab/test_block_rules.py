"""Block plans for every shipped config: FP equivalence, unit kinds, bits, heads untouched."""
import copy

import pytest
import torch

from qdrop_mm.core import QuantLayer, QuantResidual, quant_state
from qdrop_mm.core.adaround import AdaRoundQuantizer
from qdrop_mm.core.lsq import LSQActQuantizer
from qdrop_mm.openmmlab import PTQSettings
from qdrop_mm.openmmlab.block_plan import UnsupportedModuleError, plan_model, scope_paths

from .conftest import build_model_from_config

# config, expected (#stem layers, #blocks, #neck layers), neck modules whose outputs stay FP
CASES = [
    ('configs/faster_rcnn_r50_w4a4.py', (1, 16, 8), 'neck.fpn_convs'),
    ('configs/retinanet_r50_w4a4.py', (1, 16, 8), 'neck.fpn_convs'),
    ('configs/mask_rcnn_r50_w4a4.py', (1, 16, 8), 'neck.fpn_convs'),
    ('configs/retinanet_mobilenetv2_fpn_w4a4.py', (2, 17, 8), 'neck.fpn_convs'),
    ('configs/deeplabv3_r50_w4a4.py', (3, 16, 0), None),
    ('configs/pspnet_r50_w4a4.py', (3, 16, 0), None),
]


def _quantizers(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


@pytest.mark.parametrize('config,counts,fp_out', CASES, ids=[c[0].split('/')[-1] for c in CASES])
def test_plan_fp_equivalent_and_placed_as_spec(config, counts, fp_out):
    cfg, model = build_model_from_config(config)
    ref = copy.deepcopy(model)
    settings = PTQSettings.from_cfg(dict(cfg.ptq, w_observer='minmax', a_observer='minmax'))
    x = torch.randn(1, 3, 96, 128) * 50
    plan = plan_model(model, settings, lambda: model.extract_feat(x))
    assert plan.uncalled == []
    kinds = [u.kind for u in plan.units]
    backbone_layers = [u for u in plan.units if u.kind == 'layer' and u.name.startswith('backbone')]
    neck = [u for u in plan.units if u.name.startswith('neck')]
    assert (len(backbone_layers), kinds.count('block'), len(neck)) == counts
    # the first unit is the stem and the only 8-bit one
    assert plan.units[0].name.startswith('backbone')
    first_bits = {q.bits for q in _quantizers(plan.units[0].module, AdaRoundQuantizer)}
    assert first_bits == {8}
    assert {q.bits for u in plan.units[1:] for q in _quantizers(u.module, AdaRoundQuantizer)} == {4}
    # heads untouched
    for name, child in model.named_children():
        if name not in scope_paths(model, settings.scope):
            assert not _quantizers(child, AdaRoundQuantizer), name
    # output convs of the FPN keep FP outputs; every residual block quantizes its output
    if fp_out:
        for u in neck:
            assert (u.module.act_quantizer is None) == u.name.startswith(fp_out)
    for u in plan.units:
        if isinstance(u.module, QuantResidual):
            assert u.module.act_quantizer is not None
            assert u.module.branch[-1].act_quantizer is None
    with torch.no_grad(), quant_state(model, weight=False, act=False):
        out, expected = model.extract_feat(x), ref.extract_feat(x)
    for a, b in zip(out, expected):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_unknown_scope_and_unsupported_modules():
    cfg, model = build_model_from_config('configs/faster_rcnn_r50_w4a4.py')
    with pytest.raises(ValueError, match="'backbon' matches no module"):
        plan_model(model, PTQSettings.from_cfg(dict(scope=['backbon'])))
    cfg, model = build_model_from_config(
        'configs/faster_rcnn_r50_w4a4.py',
        {'model.backbone.dcn': dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
         'model.backbone.stage_with_dcn': (False, True, False, False)})
    with pytest.raises(UnsupportedModuleError, match='DCN'):
        plan_model(model, PTQSettings.from_cfg(dict(w_observer='minmax')))


def test_overrides_and_heads_in_scope():
    cfg, model = build_model_from_config('configs/retinanet_r50_w4a4.py')
    settings = PTQSettings.from_cfg(dict(w_observer='minmax', scope=['backbone', 'neck', 'bbox_head'],
                                         overrides={'backbone.layer4': dict(w_bits=8), 'backbone.layer4.2': dict(w_bits=3)}))
    plan = plan_model(model, settings)
    bits = {u.name: {q.bits for q in _quantizers(u.module, AdaRoundQuantizer)} for u in plan.units}
    assert bits['backbone.layer4.0'] == {8} and bits['backbone.layer4.2'] == {3} and bits['backbone.layer3.0'] == {4}
    assert any(n.startswith('bbox_head.') for n in bits)
    assert all(isinstance(m, QuantLayer) for n, m in model.bbox_head.named_children() if n == 'retina_cls')


def _unit_bits(plan):
    return {u.name: {q.bits for q in _quantizers(u.module, AdaRoundQuantizer)} for u in plan.units}


@pytest.mark.parametrize('scope,eight_bit', [
    (['backbone', 'neck'], ['backbone.conv1']),
    (['neck', 'backbone'], ['backbone.conv1']),  # the stem, not the first layer the walker happens to build
    (['neck'], []),  # the network's first layer is not in scope: nothing at first_layer_bits
])
def test_first_layer_is_the_stem_whatever_the_scope_order(scope, eight_bit):
    cfg, model = build_model_from_config('tests/openmmlab/configs/faster_rcnn_r18_coco128_tiny.py')
    plan = plan_model(model, PTQSettings.from_cfg(dict(w_observer='minmax', scope=scope)))
    bits = _unit_bits(plan)
    assert sorted(n for n, b in bits.items() if b == {8}) == eight_bit
    assert all(b == {4} for n, b in bits.items() if n not in eight_bit)
    assert len(bits) == (17 if 'backbone' in scope else 8)


def test_saved_unit_order_is_kept_without_a_forward():
    _, model = build_model_from_config('tests/openmmlab/configs/faster_rcnn_r18_coco128_tiny.py')
    settings = PTQSettings.from_cfg(dict(w_observer='minmax', scope=['neck', 'backbone']))
    built = [u.name for u in plan_model(model, settings).units]
    assert built[0].startswith('neck.')  # construction order follows the scope list
    _, model = build_model_from_config('tests/openmmlab/configs/faster_rcnn_r18_coco128_tiny.py')
    saved = sorted(built, key=lambda n: (not n.startswith('backbone'), n))
    assert [u.name for u in plan_model(model, settings, unit_order=saved).units] == saved


def _placement(unit):
    """(activations quantized per branch layer, shortcut output quantized, block output quantized)."""
    branch = unit.branch if isinstance(unit, QuantResidual) else unit
    shortcut = unit.shortcut if isinstance(unit, QuantResidual) else None
    layers = [m for m in branch.modules() if isinstance(m, QuantLayer)]
    short = [m for m in shortcut.modules() if isinstance(m, QuantLayer)] if shortcut is not None else []
    return ([m.act_quantizer is not None for m in layers], [m.act_quantizer is not None for m in short],
            isinstance(unit, QuantResidual) and unit.act_quantizer is not None)


def test_the_speed_benchmark_models_place_quantizers_as_the_rules_do():
    from qdrop_mm.core import reference_models as ref
    _, model = build_model_from_config('configs/faster_rcnn_r50_w4a4.py')
    plan = plan_model(model, PTQSettings.from_cfg(dict(w_observer='minmax', a_observer='minmax')))
    rule_units = {u.name: u.module for u in plan.units}
    bottleneck = ref.quantize_bottleneck(ref.Bottleneck(64, 16, stride=2), 4, 4)
    assert _placement(bottleneck) == _placement(rule_units['backbone.layer2.0']) == ([True, True, False], [False], True)
    _, mbv2 = build_model_from_config('configs/retinanet_mobilenetv2_fpn_w4a4.py')
    plan = plan_model(mbv2, PTQSettings.from_cfg(dict(w_observer='minmax', a_observer='minmax')))
    rules = [u.module for u in plan.units if u.kind == 'block']
    residual = next(m for m in rules if isinstance(m, QuantResidual))
    plain = next(m for m in rules if not isinstance(m, QuantResidual) and len(_placement(m)[0]) == 3)
    assert _placement(ref.quantize_inverted_residual(ref.InvertedResidual(16, 16, 1, 6), 4, 4)) == \
        _placement(residual) == ([True, True, False], [], True)
    assert _placement(ref.quantize_inverted_residual(ref.InvertedResidual(16, 24, 2, 6), 4, 4)) == \
        _placement(plain) == ([True, True, True], [], False)
