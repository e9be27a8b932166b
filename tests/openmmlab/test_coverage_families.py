"""One tiny test per model family of the stock mmdet/mmseg configs (random weights, 64x96 input, 2 iterations).

Each quantizes the model's backbone and neck (``ptq.scope='auto'``), saves the quantized state dict,
rebuilds it into a fresh model as ``--load-quantized`` does and checks the features and the model's
raw outputs (``_forward``: dense head outputs, RoI head outputs, decode-head logits) are bit-identical;
it also checks what the plan left FP, that BatchNorms in scope are folded, and the block units formed.
"""
import copy

import pytest
import torch
from torch import nn

from qdrop_mm.core import QuantLayer, run_ptq, weight_quantizers
from qdrop_mm.core.qattention import QuantMultiheadAttention
from qdrop_mm.openmmlab import PTQSettings
from qdrop_mm.openmmlab.block_plan import plan_model, scope_paths
from qdrop_mm.openmmlab.checkpoint import atomic_save, quantized_checkpoint
from qdrop_mm.openmmlab.ptq_loop import rebuild_quantized
from qdrop_mm.openmmlab.settings import PTQConfigError

from .conftest import randomize_bn

SETTINGS = dict(iters=2, num_images=1, batch_size=1, w_observer='minmax', a_observer='minmax')


def build_stock_model(name: str):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from qdrop_mm.benchmarks.coverage import CASES, stock_config_path
    case = next(c for c in CASES if c.name == name)
    cfg = Config.fromfile(stock_config_path(case))
    cfg.model.backbone.init_cfg = None
    cfg.model.update(dict(case.model))  # what the tiny input needs (e.g. DINO's number of queries)
    if case.package == 'mmseg':
        cfg.model.pretrained = None
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    randomize_bn(model)
    return model.eval()


def quantize_and_reload(name: str, tmp_path, **options):
    """(plan, quantized model, reloaded model, input); reconstruction with 2 iterations per unit."""
    model = build_stock_model(name)
    fresh = copy.deepcopy(model)
    settings = PTQSettings.from_cfg(dict(SETTINGS, **options))
    x = torch.rand(1, 3, 64, 96) * 255
    plan = plan_model(model, settings, lambda: model.extract_feat(x))
    run_ptq(model, plan.units, [x], lambda m, b: m.extract_feat(b), settings.build_method())
    path = str(tmp_path / 'quantized.pth')
    atomic_save(quantized_checkpoint(model.state_dict(), {'ptq': settings.to_dict()}), path)
    rebuild_quantized(fresh, path, PTQSettings())
    with torch.no_grad():
        for a, b in zip(model.extract_feat(x), fresh.extract_feat(x)):
            assert a.shape == b.shape and torch.equal(a, b)
        first, second = predictions(model, x), predictions(fresh, x)
    assert first and len(first) == len(second) and all(t.numel() > 0 for t in first)
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, second))
    return plan, model


def predictions(model, x):
    """The model's raw outputs (``_forward``: head outputs per level / RoI, decode-head logits), no score threshold."""
    h, w = x.shape[-2:]
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1.0, 1.0))
    if hasattr(model, 'decode_head'):
        from mmseg.structures import SegDataSample as Sample
    else:
        from mmdet.structures import DetDataSample as Sample
    return list(_tensors(model._forward(x, [Sample(metainfo=meta)])))


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _tensors(v)
    elif isinstance(out, dict):
        for k in sorted(out):
            yield from _tensors(out[k])


def bn_in_scope(model, settings=PTQSettings()):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
               for p in scope_paths(model, settings.scope) for m in model.get_submodule(p).modules())


def counts(plan):
    return (sum(u.kind == 'block' for u in plan.units), sum(u.kind == 'layer' for u in plan.units))


def test_rtmdet_tiny_cspnext_blocks(tmp_path):
    plan, model = quantize_and_reload('rtmdet_tiny', tmp_path)
    # backbone: 4 CSP layers + SPP; neck: 4 CSP layers; layers: 3 stem + 4 downsample convs,
    # neck 2 reduce + 2 downsample + 3 output convs
    assert counts(plan) == (9, 14)
    assert plan.fp_layers == [] and bn_in_scope(model) == 0 and plan.uncalled == []


def test_yolox_s_cspdarknet_blocks(tmp_path):
    plan, model = quantize_and_reload('yolox_s', tmp_path)
    # backbone: 4 CSP layers + SPP; neck: 4 CSP layers; layers: Focus conv + 4 downsample convs, neck 2 + 2 + 3
    assert counts(plan) == (9, 12)
    assert plan.fp_layers == [] and bn_in_scope(model) == 0


def test_hrnet_bns_folded(tmp_path):
    plan, model = quantize_and_reload('fcn_hr18s', tmp_path)
    assert bn_in_scope(model) == 0 and plan.fp_layers == []
    assert [u.name for u in plan.units[:2]] == ['backbone.conv1', 'backbone.conv2']
    blocks = [u.name for u in plan.units if u.kind == 'block']
    # fuse paths of two or three stride-2 convs: (2, 0) in 3 stage-3 modules; (2, 0), (3, 0), (3, 1) in 2 stage-4
    fuse = [n for n in blocks if '.fuse_layers.' in n]
    assert sorted(fuse) == sorted([f'backbone.stage3.{m}.fuse_layers.2.0' for m in range(3)]
                                  + [f'backbone.stage4.{m}.fuse_layers.{i}.{j}' for m in range(2)
                                     for i, j in ((2, 0), (3, 0), (3, 1))])
    assert counts(plan) == (40 + 9, 61 - 20)  # each path's 2 or 3 layer units are now one block


def test_deeplabv3plus_without_neck_default_scope(tmp_path):
    plan, model = quantize_and_reload('deeplabv3plus_r50', tmp_path)
    assert scope_paths(model, PTQSettings().scope) == ('backbone',)
    assert counts(plan) == (16, 3) and plan.fp_layers == [] and bn_in_scope(model) == 0


def test_dino_groupnorm_neck_stays_fp_between_layer_and_quantizer(tmp_path):
    plan, model = quantize_and_reload('dino_r50', tmp_path)
    assert [t for _, t in plan.unfolded_norms] == ['GroupNorm'] * 4
    layer = model.neck.convs[0]
    assert isinstance(layer.norm, nn.GroupNorm) and layer.act_quantizer is not None
    assert plan.fp_layers == [] and bn_in_scope(model) == 0


def test_swin_blocks_are_units_with_attention_ffn_and_mmcv_linear_quantized(tmp_path):
    plan, model = quantize_and_reload('mask_rcnn_swin_t', tmp_path)
    assert plan.fp_layers == [] and bn_in_scope(model) == 0
    # 12 Swin blocks (window attention + FFN, called with hw_shape) as block units; patch embedding,
    # 3 patch mergings and 8 FPN convs as layers
    assert counts(plan) == (12, 1 + 3 + 8)
    block = model.backbone.stages[0].blocks[1]
    assert next(u for u in plan.units if u.module is block).name == 'backbone.stages.0.blocks.1'
    ffn = block.ffn.layers
    first, second = ffn[0][0], ffn[1]  # mmcv's Linear wrapper, quantized like nn.Linear
    assert isinstance(first, QuantLayer) and isinstance(second, QuantLayer)
    assert first.input_quantizer is not None and first.act_quantizer is not None  # after GELU
    assert second.act_quantizer is None  # joins the residual stream in FP
    qkv, proj = block.attn.w_msa.qkv, block.attn.w_msa.proj
    assert qkv.input_quantizer is not None and qkv.act_quantizer is not None  # q, k, v: the matmul inputs
    assert proj.input_quantizer is not None and proj.act_quantizer is None
    assert weight_quantizers(block) and all(q.mode == 'hard' for q in weight_quantizers(block))


def test_segformer_layers_are_units_with_attention_projections_quantized(tmp_path):
    plan, model = quantize_and_reload('segformer_b0', tmp_path)
    assert plan.fp_layers == [] and scope_paths(model, PTQSettings().scope) == ('backbone',)
    layer = model.backbone.layers[0][1][0]
    attn = layer.attn.attn
    assert isinstance(attn, QuantMultiheadAttention)
    assert all(getattr(attn, n).input_quantizer is not None for n in ('q_proj', 'k_proj', 'v_proj', 'out_proj'))
    assert isinstance(layer.attn.sr, QuantLayer)  # spatial reduction (sr_ratio 8) inside the unit
    # 8 transformer layers (efficient attention + MixFFN, called with hw_shape) as block units; the
    # 4 patch embeddings as layers
    assert counts(plan) == (8, 4)
    assert next(u for u in plan.units if u.module is layer).kind == 'block'


def test_override_or_scope_matching_nothing_is_an_error():
    model = build_stock_model('rtmdet_tiny')
    with pytest.raises(ValueError, match=r"^ptq.overrides path 'backbone.stage9' matches no quantized layer"):
        plan_model(model, PTQSettings.from_cfg(dict(overrides={'backbone.stage9': dict(w_bits=8)})))
    with pytest.raises(ValueError, match=r"^ptq.scope entry 'nek' matches no module"):
        plan_model(build_stock_model('rtmdet_tiny'), PTQSettings.from_cfg(dict(scope=['backbone', 'nek'])))
    with pytest.raises(PTQConfigError, match=r"^ptq.scope must be 'auto' or a non-empty list"):
        PTQSettings.from_cfg(dict(scope=[]))


def test_layers_no_rule_quantizes_are_listed_with_their_share():
    from qdrop_mm.openmmlab.report import bits_summary
    model = build_stock_model('rtmdet_tiny')
    # the PAFPN rule converts the children it knows: anything else in scope must still be found and listed
    model.neck.extra = nn.Sequential(nn.Conv1d(8, 16, 3), nn.MultiheadAttention(16, 2))
    plan = plan_model(model, PTQSettings.from_cfg(SETTINGS))
    assert [(f.name, f.type, f.num_weights) for f in plan.fp_layers] == [
        ('neck.extra.0', 'Conv1d', 8 * 16 * 3), ('neck.extra.1', 'MultiheadAttention', 3 * 16 * 16 + 16 * 16)]
    quantized, fp = plan.num_weights()
    assert fp == 384 + 1024 and quantized > 10 * fp
    bits = bits_summary(plan.units, fp)
    assert bits['quantized_weight_share'] == pytest.approx(quantized / (quantized + fp), abs=1e-4)
    assert bits['avg_w_bits_fp_as_32'] > bits['avg_w_bits_weighted_by_num_weights']
    assert plan.fp_summary().startswith('2 weight layer(s) in ptq.scope stay FP, no rule quantizes them '
                                     '(1 Conv1d, 1 MultiheadAttention; 1408 weights, 0.0% of the weights in scope)')


def _rois_seen(model, forward, batch, quantized: bool):
    from qdrop_mm.core import quant_state
    seen = []
    handle = model.roi_head.bbox_roi_extractor.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    try:
        with torch.no_grad(), quant_state(model, weight=quantized, act=quantized, drop_prob=1.0 if quantized else None):
            forward(model, batch)
    finally:
        handle.remove()
    return seen[0]


def test_roi_head_units_crop_the_fp_proposals_on_both_passes():
    """Quantizing the backbone/neck/RPN moves the proposals; FixedProposalForward gives the RoI head the FP
    network's boxes on the FP and the quantized pass alike, so its units have FP targets."""
    from mmdet.structures import DetDataSample
    from qdrop_mm.core import calibrate_activations
    from qdrop_mm.openmmlab.calibration import FixedProposalForward, calibration_forward, model_forward
    model = build_stock_model('faster_rcnn_r50')
    torch.manual_seed(1)
    meta = dict(img_shape=(64, 96), ori_shape=(64, 96), scale_factor=(1.0, 1.0))
    batch = {'inputs': [(torch.rand(3, 64, 96) * 255).to(torch.uint8)], 'data_samples': [DetDataSample(metainfo=meta)]}
    scope = ['backbone', 'neck', 'rpn_head', 'roi_head']
    settings = PTQSettings.from_cfg(dict(SETTINGS, scope=scope))
    forward = calibration_forward(model, scope, [batch])
    assert isinstance(forward, FixedProposalForward)
    plan = plan_model(model, settings, lambda: forward(model, batch))
    roi_units = [u.name for u in plan.units if u.name.startswith('roi_head.')]
    assert roi_units == ['roi_head.bbox_head.shared_fcs.0', 'roi_head.bbox_head.shared_fcs.1',
                         'roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg']
    assert plan.fp_layers == [] and plan.units[-1].name.startswith('roi_head.')
    fc_cls = model.roi_head.bbox_head.fc_cls
    assert fc_cls.act_quantizer is None and model.roi_head.bbox_head.shared_fcs[0].act_quantizer is not None
    calibrate_activations(model, [batch], forward)
    fixed_fp, fixed_q = (_rois_seen(model, forward, batch, q) for q in (False, True))
    assert torch.equal(fixed_fp, fixed_q)
    free_fp, free_q = (_rois_seen(model, model_forward, batch, q) for q in (False, True))
    # the fixed boxes are the FP network's (computed before BN folding: equal up to float rounding)
    assert free_fp.shape == fixed_fp.shape and torch.allclose(free_fp, fixed_fp, atol=1e-3)
    assert free_fp.shape != free_q.shape or not torch.equal(free_fp, free_q)  # what the fix is for


def test_cascade_stages_crop_the_fp_boxes_on_both_passes():
    """A cascade's later stages crop the boxes its earlier stages regress; FixedProposalForward records every
    stage's FP crops and replays them on the quantized pass, so each stage's box head has FP targets."""
    from mmdet.structures import DetDataSample
    from qdrop_mm.core import calibrate_activations, quant_state
    from qdrop_mm.openmmlab.calibration import FixedProposalForward, calibration_forward, model_forward
    model = build_stock_model('cascade_rcnn_r50')
    torch.manual_seed(1)
    meta = dict(img_shape=(64, 96), ori_shape=(64, 96), scale_factor=(1.0, 1.0))
    batch = {'inputs': [(torch.rand(3, 64, 96) * 255).to(torch.uint8)], 'data_samples': [DetDataSample(metainfo=meta)]}
    scope = ['backbone', 'neck', 'roi_head']
    forward = calibration_forward(model, scope, [batch])
    assert isinstance(forward, FixedProposalForward)
    plan = plan_model(model, PTQSettings.from_cfg(dict(SETTINGS, scope=scope)), lambda: forward(model, batch))
    assert [u.name for u in plan.units if u.name.startswith('roi_head.')] == [
        f'roi_head.bbox_head.{i}.{fc}' for i in range(3) for fc in ('shared_fcs.0', 'shared_fcs.1', 'fc_cls', 'fc_reg')]
    calibrate_activations(model, [batch], forward)

    def crops(fwd, quantized):
        seen = []
        handles = [e.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
                   for e in model.roi_head.bbox_roi_extractor]
        try:
            with torch.no_grad(), quant_state(model, weight=quantized, act=quantized, drop_prob=1.0 if quantized else None):
                fwd(model, batch)
        finally:
            for h in handles:
                h.remove()
        return seen
    fixed_fp, fixed_q = crops(forward, False), crops(forward, True)
    assert len(fixed_fp) == 3 and all(torch.equal(a, b) for a, b in zip(fixed_fp, fixed_q))
    assert not torch.equal(fixed_fp[0], fixed_fp[2])  # the stages do refine the boxes
    free_q = crops(model_forward, True)
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(fixed_fp[1:], free_q[1:]))
    assert '_bbox_forward' not in vars(model.roi_head)  # the shadowing is undone



def test_a_roi_head_whose_crops_cannot_be_fixed_is_one_error_line():
    from mmdet.models.roi_heads import BaseRoIHead
    from qdrop_mm.openmmlab.ptq_loop import check_roi_head_scope
    from qdrop_mm.openmmlab.settings import PTQConfigError

    class OddRoIHead(BaseRoIHead):
        init_bbox_head = init_mask_head = init_assigner_sampler = loss = lambda *a, **k: None

        def __init__(self):
            nn.Module.__init__(self)
            self.fc = nn.Linear(4, 4)
    model = build_stock_model('faster_rcnn_r50')
    check_roi_head_scope(model, ['roi_head.bbox_head'])
    model.roi_head = OddRoIHead()
    with pytest.raises(PTQConfigError, match=r"^ptq.scope entry 'roi_head.fc' is \(in\) a OddRoIHead: its inputs"):
        check_roi_head_scope(model, ['backbone', 'roi_head.fc'])
