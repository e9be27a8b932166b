"""--whole: the tiny quantized Faster R-CNN R18-FPN as one graph (QDQ backbone + neck, FP RPN and RoI head)."""
import pytest
import torch

from ..openmmlab.conftest import REPO
from .test_export_onnx_tool import MAX_REL, SHAPE, _assert_parity, _tool, quantized  # noqa: F401

pytest.importorskip('mmdet')
pytest.importorskip('onnxruntime')

LEVELS = 5  # FPN outputs (P2-P6)


def _data_options(root):
    return ['--cfg-options', f'test_dataloader.dataset.data_root={root}/',
            f'test_evaluator.ann_file={root}/annotations/instances_val2017.json']


@pytest.fixture(scope='module')
def whole(quantized, coco128, tmp_path_factory):
    path, _ = quantized
    out = tmp_path_factory.mktemp('whole') / 'frcnn_whole.onnx'
    result = _tool('--quantized', path, '--out', out, '--whole', '--input-shape', *SHAPE, '--dynamic', '--check',
                   '--evaluate', 2, *_data_options(coco128))
    return result


def test_graph_inputs_and_raw_head_outputs(whole):
    import onnx
    graph = onnx.load(whole['out']).graph
    assert [i.name for i in graph.input] == ['input', 'rois']
    names = [o.name for o in graph.output]
    assert names == [f'rpn_cls_{i}' for i in range(LEVELS)] + [f'rpn_reg_{i}' for i in range(LEVELS)] + [
        'cls_score', 'bbox_pred']
    ops = {n.op_type for n in graph.node}
    assert 'RoiAlign' in ops and 'QuantizeLinear' in ops
    # the backbone + neck are written as in the extract_feat export; the heads add no quantizer
    assert whole['nodes']['QuantizeLinear'] == 21 + 13 and len(whole['summary'].activations) == 21
    roi_align = [n for n in graph.node if n.op_type == 'RoiAlign']
    assert len(roi_align) == 4  # one per RoI level, masked sum
    assert all(a.s == b'half_pixel' for n in roi_align for a in n.attribute
               if a.name == 'coordinate_transformation_mode')


def test_raw_outputs_match_pytorch_in_default_session(whole):
    # every output, the RoI head's for the example RoIs included, in onnxruntime's default session
    _assert_parity(whole['parity_bias_int32'], whole['agreement'])
    _assert_parity(whole['parity'], whole['agreement'])
    n_rois = 8
    anchors = 3
    sizes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    assert whole['parity'].numel == sum(anchors * (1 + 4) * h * w for h, w in sizes) + n_rois * (81 + 4 * 80)


def test_rois_and_shape_are_dynamic(whole, quantized):
    from qdrop_mm.export import GraphRunner, WholeModel, compare_outputs, example_rois, random_input
    model = whole['model']  # biases on the int32 grid, as exported
    x = random_input((1, 3, 96, 128), seed=3)
    rois = example_rois(x, 3)
    with torch.no_grad():
        ref = WholeModel(model)(x, rois)
    out = GraphRunner(whole['out'])(x, rois)
    assert out[-2].shape == (3, 81) and out[-1].shape == (3, 320)
    parity = compare_outputs(list(ref), [o.numpy() for o in out])
    assert parity.max_rel <= MAX_REL or parity.mismatch_fraction <= 1e-2, parity.describe()


def test_roi_features_equal_mmdet_extractor(whole):
    from qdrop_mm.export.whole import extract_roi_features
    model = whole['model']
    x = torch.randn(1, 3, *SHAPE[2:], generator=torch.Generator().manual_seed(5))
    sizes = torch.tensor([20.0, 60.0, 90.0, 120.0, 240.0, 480.0])  # finest_scale 56: levels 0, 1, 1, 2, 3, 3
    rois = torch.stack([torch.zeros(6), 4 + 0 * sizes, 2 + 0 * sizes, 4 + sizes, 2 + sizes], 1)
    with torch.no_grad():
        feats = model.extract_feat(x)
        ours = extract_roi_features(model.roi_head.bbox_roi_extractor, feats, rois)
        theirs = model.roi_head.bbox_roi_extractor(feats[:4], rois)
    levels = model.roi_head.bbox_roi_extractor.map_roi_levels(rois, 4)
    assert len(set(levels.tolist())) == 4  # the example RoIs reach every level
    assert torch.equal(ours, theirs)


def test_detections_decoded_from_onnxruntime_match_pytorch(whole):
    evaluation = whole["evaluation"]
    assert evaluation['images'] == 2
    agreement = evaluation['agreement']
    assert agreement['reference'] > 0
    # same detections (label, box within 0.01 px, score within 1e-3) unless a quantizer value sits on a rounding
    # boundary in one of the two images (then that image's detections may differ)
    assert agreement['images_identical'] >= 1 and agreement['matched'] >= 0.5 * agreement['reference'], agreement
    torch_map = evaluation['metrics']['pytorch']['coco/bbox_mAP']
    ort_map = evaluation['metrics']['onnxruntime']['coco/bbox_mAP']
    assert abs(torch_map - ort_map) <= 0.002 or agreement['images_identical'] < 2


def test_evaluate_needs_whole(quantized):
    path, _ = quantized
    with pytest.raises(SystemExit, match='^error: --evaluate needs --whole'):
        _tool('--quantized', path, '--evaluate', 2)


def test_console_entry_point(quantized, tmp_path, monkeypatch, capsys):
    from qdrop_mm.cli.export_onnx import console
    path, _ = quantized
    config = f'{REPO}/tests/openmmlab/configs/faster_rcnn_r18_coco128_tiny.py'
    monkeypatch.setattr('sys.argv', ['qdrop-export-onnx', config, '--quantized', str(path),
                                     '--out', str(tmp_path / 'c.onnx'), '--input-shape', *map(str, SHAPE)])
    console()
    assert 'wrote ' + str(tmp_path / 'c.onnx') in capsys.readouterr().out
    assert (tmp_path / 'c.onnx').stat().st_size > 0


def _random_quantized(config, tmp_path):
    """A quantized.pth of ``config`` + the default PTQ section: random weights, W4A4, calibrated, hardened."""
    import os.path as osp
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from qdrop_mm.core import QuantLayer, calibrate_activations
    from qdrop_mm.openmmlab import PTQSettings
    from qdrop_mm.openmmlab.block_plan import plan_model
    from qdrop_mm.openmmlab.checkpoint import quantized_checkpoint
    from ..openmmlab.conftest import randomize_bn
    cfg_path = tmp_path / 'w4a4.py'
    cfg_path.write_text(f"_base_ = ['{osp.join(REPO, config)}', '{osp.join(REPO, 'configs/_base_/ptq_qdrop.py')}']\n")
    cfg = Config.fromfile(str(cfg_path))
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    randomize_bn(model)
    model.eval()
    settings = PTQSettings.from_cfg(cfg.ptq)
    plan_model(model, settings)
    g = torch.Generator().manual_seed(0)
    calibrate_activations(model, [torch.randn(2, 3, 96, 96, generator=g)], lambda m, b: m.extract_feat(b))
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.weight_quantizer.init_rounding(m.weight)
            m.weight_quantizer.set_mode('hard')
    path = tmp_path / 'quantized.pth'
    torch.save(quantized_checkpoint(model.state_dict(), {'ptq': settings.to_dict()}), path)
    return str(cfg_path), path


@pytest.mark.parametrize('config,kind,outputs', [
    ('configs/demo/retinanet_r18_fpn_shapes.py', 'single_stage',
     [f'cls_{i}' for i in range(LEVELS)] + [f'reg_{i}' for i in range(LEVELS)]),
    ('configs/demo/sem_fpn_r18_shapes.py', 'segmentor', ['seg_logits']),
])
def test_single_stage_and_segmentor_export_whole(config, kind, outputs, tmp_path, one_thread):
    import onnx
    from qdrop_mm.cli.export_onnx import main
    if kind == 'segmentor':
        pytest.importorskip('mmseg')
    cfg_path, path = _random_quantized(config, tmp_path)
    result = main([cfg_path, '--quantized', str(path), '--out', str(tmp_path / 'w.onnx'), '--whole',
                   '--input-shape', '1', '3', '96', '96', '--check'])
    assert result['kind'] == kind
    graph = onnx.load(result['out']).graph
    assert [i.name for i in graph.input] == ['input'] and [o.name for o in graph.output] == outputs
    _assert_parity(result['parity_bias_int32'], result['agreement'])


def _retinanet_with_spread_scores(model) -> None:
    """Random RetinaNet class logits sit at the prior (scores ~0.01, under score_thr): spread them, no ties."""
    with torch.no_grad():
        model.bbox_head.retina_cls.weight.mul_(3)
        model.bbox_head.retina_cls.bias.zero_()


def test_decode_and_nms_in_graph_equal_mmdet(tmp_path, one_thread):
    import onnx
    from qdrop_mm.export import GraphRunner, WholeModel, export_onnx, random_input
    from ..openmmlab.conftest import build_model_from_config
    _, model = build_model_from_config('configs/demo/retinanet_r18_fpn_shapes.py')
    _retinanet_with_spread_scores(model)
    x = random_input((1, 3, 256, 256), seed=0)
    whole = WholeModel(model, nms=True).eval()
    meta = dict(img_shape=(256, 256), scale_factor=(1.0, 1.0))
    with torch.no_grad():
        dets, labels = whole(x)
        ref = model.bbox_head.predict_by_feat(*model.bbox_head(model.extract_feat(x)), batch_img_metas=[meta])[0]
    # TopK over (anchor, class) pairs then masking selects what mmdet's threshold-then-sort selects
    assert len(dets) == len(ref) == model.bbox_head.test_cfg.max_per_img
    assert torch.equal(dets[:, :4], ref.bboxes) and torch.equal(dets[:, 4], ref.scores)
    assert torch.equal(labels, ref.labels)
    export_onnx(whole, x, str(tmp_path / 'nms.onnx'), output_names=whole.output_names(5),
                dynamic_axes={'dets': {0: 'num_dets'}, 'labels': {0: 'num_dets'}})
    ops = {n.op_type for n in onnx.load(str(tmp_path / 'nms.onnx')).graph.node}
    assert {'TopK', 'NonMaxSuppression'} <= ops
    out_dets, out_labels = GraphRunner(str(tmp_path / 'nms.onnx'))(x)
    # onnxruntime's default session: the same detections in the same order (measured: boxes within 1e-4 px)
    assert torch.equal(out_labels, labels)
    assert (out_dets[:, :4] - dets[:, :4]).abs().max() <= 1e-3 and (out_dets[:, 4] - dets[:, 4]).abs().max() <= 1e-5


def test_nms_refuses_what_it_cannot_write():
    from qdrop_mm.export import WholeModel
    from ..openmmlab.conftest import build_model_from_config
    _, model = build_model_from_config('configs/demo/retinanet_r18_fpn_shapes.py',
                                       {'model.test_cfg.nms': dict(type='soft_nms', iou_threshold=0.5)})
    with pytest.raises(ValueError, match='test_cfg.nms must be plain nms'):
        WholeModel(model, nms=True)
    _, model = build_model_from_config('configs/demo/faster_rcnn_r18_fpn_shapes.py')
    with pytest.raises(ValueError, match='single-stage detectors, not two_stage'):
        WholeModel(model, nms=True)


def test_heads_with_score_factors_are_refused_not_truncated():
    from qdrop_mm.export import WholeModel, random_input
    from ..openmmlab.conftest import build_model_from_config
    _, model = build_model_from_config('configs/demo/retinanet_r18_fpn_shapes.py')
    head_forward = model.bbox_head.forward
    model.bbox_head.forward = lambda feats: (*head_forward(feats), [f[:, :1] for f in feats])  # e.g. centerness
    with pytest.raises(ValueError, match='RetinaHead returns 3 outputs'):
        WholeModel(model.eval())(random_input((1, 3, 64, 64), seed=0))


def test_retinanet_w4a4_with_nms_through_the_tool(shapes_root, tmp_path, one_thread):
    import onnx
    from qdrop_mm.cli.export_onnx import main
    from .conftest import SHAPES_VAL, demo_config
    base = demo_config('retinanet_r18_fpn_shapes', shapes_root, tmp_path)
    cfg_path, path = _random_quantized(base, tmp_path)
    saved = torch.load(path, weights_only=True)
    state = saved['state_dict']
    state['bbox_head.retina_cls.weight'] *= 3
    state['bbox_head.retina_cls.bias'].zero_()
    torch.save(saved, path)
    image = f'{shapes_root}/val2017/000000000001.jpg'
    result = main([cfg_path, '--quantized', str(path), '--whole', '--nms', '--check-image', image, '--evaluate'])
    graph = onnx.load(result['out']).graph
    assert [o.name for o in graph.output] == ['dets', 'labels']
    assert 'NonMaxSuppression' in {n.op_type for n in graph.node}
    _assert_parity(result['parity_bias_int32'], result['agreement'])
    agreement = result['evaluation']['agreement']
    assert agreement['images'] == SHAPES_VAL and agreement['reference'] == 100 * SHAPES_VAL
    assert agreement['images_identical'] >= 0.75 * SHAPES_VAL and agreement['matched'] >= 0.9 * agreement['reference']


def test_nms_graph_with_no_detection_gives_empty_outputs(tmp_path, one_thread):
    from qdrop_mm.export import GraphRunner, WholeModel, export_onnx, random_input
    from ..openmmlab.conftest import build_model_from_config
    _, model = build_model_from_config('configs/demo/retinanet_r18_fpn_shapes.py')  # scores ~0.01 < score_thr
    x = random_input((1, 3, 128, 128), seed=0)
    whole = WholeModel(model, nms=True).eval()
    with torch.no_grad():
        assert [tuple(t.shape) for t in whole(x)] == [(0, 5), (0,)]
    export_onnx(whole, x, str(tmp_path / 'empty.onnx'), output_names=whole.output_names(5),
                dynamic_axes={'dets': {0: 'num_dets'}, 'labels': {0: 'num_dets'}})
    assert [tuple(t.shape) for t in GraphRunner(str(tmp_path / 'empty.onnx'))(x)] == [(0, 5), (0,)]
