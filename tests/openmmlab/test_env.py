"""The pinned OpenMMLab stack works on this torch: compiled mmcv ops and a real Faster R-CNN forward."""
import pytest
import torch

mmcv_ops = pytest.importorskip('mmcv.ops')


def test_compiled_nms_and_roi_align():
    from mmcv.utils import ext_loader
    ext = ext_loader.load_ext('_ext', ['nms', 'roi_align_forward'])
    assert hasattr(ext, 'nms')
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = mmcv_ops.nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    feat = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float32)
    out = mmcv_ops.roi_align(feat, rois, (1, 1), 1.0, 0, 'avg', True)
    assert out.item() == pytest.approx(feat.mean().item())


def test_faster_rcnn_r50_fpn_forward_on_cpu(tmp_path):
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg_file = tmp_path / 'frcnn.py'
    cfg_file.write_text("_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_2x_coco.py'\n"
                        "model = dict(backbone=dict(init_cfg=None), test_cfg=dict(rcnn=dict(score_thr=0.0)))\n")
    cfg = Config.fromfile(str(cfg_file))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    assert isinstance(model.roi_head.bbox_roi_extractor.roi_layers[0], mmcv_ops.RoIAlign)
    img = torch.rand(3, 160, 224) * 255
    sample = DetDataSample(metainfo=dict(img_shape=(160, 224), ori_shape=(160, 224), scale_factor=(1.0, 1.0)))
    with torch.no_grad():
        data = model.data_preprocessor({'inputs': [img], 'data_samples': [sample]}, False)
        feats = model.extract_feat(data['inputs'])
        out = model(**data, mode='predict')
    assert [f.shape[1] for f in feats] == [256] * 5
    assert [f.shape[-1] for f in feats] == [56, 28, 14, 7, 4]
    pred = out[0].pred_instances
    assert pred.bboxes.shape[1] == 4 and len(pred.bboxes) > 0
    assert (pred.bboxes[:, 2] <= 224 + 1e-3).all() and (pred.bboxes[:, 3] <= 160 + 1e-3).all()
