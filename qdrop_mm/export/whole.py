"""The whole model as one graph: backbone + neck (QDQ) and the heads' raw outputs; decoding and NMS in Python.

:func:`whole_model` wraps a detector or segmentor (its export form from :func:`~.onnx_qdq.to_qdq`, or the
fake-quant model itself as the PyTorch reference) as a module whose outputs are the heads' raw tensors:

- two-stage detectors (Faster R-CNN): inputs ``input`` (preprocessed image) and ``rois`` (K×5: batch index,
  x1, y1, x2, y2 in input pixels); outputs the RPN classification maps, the RPN regression maps (one per
  level) and the RoI head's ``cls_score`` (K×(C+1)) and ``bbox_pred`` (K×4C) for the given RoIs. RoI features
  are extracted as mmdet's ``SingleRoIExtractor`` does (level by box size, ONNX ``RoiAlign`` with
  ``half_pixel`` = mmcv's ``aligned=True``), written as a masked sum over levels so the graph has no
  data-dependent shapes;
- single-stage detectors (RetinaNet): ``input`` → classification maps, then regression maps per level; with
  ``nms=True`` (batch 1, static shape) the graph also decodes the boxes and runs NMS as mmdet's
  ``predict_by_feat`` does (:func:`decode_and_nms`: ONNX ``TopK``, ``NonMaxSuppression``) and outputs
  ``dets`` (N×5: x1, y1, x2, y2 in input pixels, score) and ``labels`` (N);
- segmentors (mmseg EncoderDecoder): ``input`` → the decode head's logits (before resizing).

:class:`GraphPredictor` runs such a graph in onnxruntime and finishes each image with the model's own
decoding (``predict_by_feat``, NMS, rescaling), so its data samples go into the model's evaluator. A
two-stage graph runs twice per batch: once for the RPN maps (with one dummy RoI), once with the proposals
decoded in Python; RPN decoding and NMS inside the graph are not done.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .onnx_io import MethodForward, onnxruntime_session, reference_outputs

ROI_ALIGN_OPSET = 16  # RoiAlign with coordinate_transformation_mode


def model_kind(model: nn.Module) -> str:
    """'two_stage', 'single_stage' or 'segmentor'; ValueError for anything else."""
    if hasattr(model, 'rpn_head') and hasattr(model, 'roi_head'):
        if getattr(model.roi_head, 'with_mask', False):
            raise ValueError(f'{type(model).__name__}: mask heads are not exported (bbox-only two-stage detectors)')
        return 'two_stage'
    if hasattr(model, 'bbox_head') and hasattr(model, 'extract_feat'):
        return 'single_stage'
    if hasattr(model, 'decode_head') and hasattr(model, 'extract_feat'):
        return 'segmentor'
    raise ValueError(f'{type(model).__name__}: whole-model export supports two-stage and single-stage mmdet '
                     f'detectors and mmseg encoder-decoder segmentors')


class _RoIAlign(torch.autograd.Function):
    """mmcv's ``roi_align`` (avg) in PyTorch; ONNX ``RoiAlign`` (opset 16) when exported."""

    @staticmethod
    def forward(ctx, feat: Tensor, rois: Tensor, out_h: int, out_w: int, spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> Tensor:
        from mmcv.ops import roi_align
        return roi_align(feat, rois, (out_h, out_w), spatial_scale, sampling_ratio, 'avg', aligned)

    @staticmethod
    def symbolic(g, feat, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned):
        index = g.op('Gather', rois, g.op('Constant', value_t=torch.tensor(0)), axis_i=1)
        batch_index = g.op('Cast', index, to_i=7)  # INT64
        boxes = g.op('Gather', rois, g.op('Constant', value_t=torch.tensor([1, 2, 3, 4])), axis_i=1)
        return g.op('RoiAlign', feat, boxes, batch_index, mode_s='avg', output_height_i=out_h,
                    output_width_i=out_w, sampling_ratio_i=sampling_ratio, spatial_scale_f=spatial_scale,
                    coordinate_transformation_mode_s='half_pixel' if aligned else 'output_half_pixel')


def extract_roi_features(extractor: nn.Module, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
    """mmdet ``SingleRoIExtractor(feats, rois)`` as a masked sum over levels (same values, static graph)."""
    feats = feats[:extractor.num_inputs]
    levels = extractor.map_roi_levels(rois, len(feats)) if len(feats) > 1 else None
    out = None
    for i, (feat, layer) in enumerate(zip(feats, extractor.roi_layers)):
        if getattr(layer, 'pool_mode', 'avg') != 'avg':
            raise ValueError(f'RoI layer {type(layer).__name__} with pool_mode {layer.pool_mode!r}: only avg exports')
        h, w = layer.output_size
        roi_feat = _RoIAlign.apply(feat, rois.type_as(feat), int(h), int(w), float(layer.spatial_scale),
                                   int(layer.sampling_ratio), bool(layer.aligned))
        if levels is not None:
            roi_feat = roi_feat * (levels == i).to(roi_feat.dtype).reshape(-1, 1, 1, 1)
        out = roi_feat if out is None else out + roi_feat
    return out


class _MultiClassNMS(torch.autograd.Function):
    """mmcv's ``batched_nms`` (per class, sorted by score), then the first ``max_per_img``; ONNX
    ``NonMaxSuppression`` + ``TopK`` when exported. ``scores`` <= 0 mark boxes that are not candidates."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, labels: Tensor, num_classes: int, iou_threshold: float,
                max_per_img: int, num_boxes: int) -> Tuple[Tensor, Tensor]:
        from mmcv.ops import batched_nms
        idx = torch.nonzero(scores > 0).flatten()
        if not len(idx):
            return boxes.new_zeros((0, 5)), labels.new_zeros((0,))
        dets, keep = batched_nms(boxes[idx], scores[idx], labels[idx], dict(type='nms', iou_threshold=iou_threshold))
        return dets[:max_per_img], labels[idx][keep[:max_per_img]]

    @staticmethod
    def symbolic(g, boxes, scores, labels, num_classes, iou_threshold, max_per_img, num_boxes):
        def const(value):
            return g.op('Constant', value_t=value)
        classes = const(torch.arange(num_classes, dtype=torch.int64).reshape(-1, 1))
        per_class = g.op('Where', g.op('Equal', classes, g.op('Unsqueeze', labels, const(torch.tensor([0])))),
                         g.op('Unsqueeze', scores, const(torch.tensor([0]))), const(torch.tensor(-1.0)))
        selected = g.op('NonMaxSuppression', g.op('Unsqueeze', boxes, const(torch.tensor([0]))),
                        g.op('Unsqueeze', per_class, const(torch.tensor([0]))),
                        const(torch.tensor([num_boxes], dtype=torch.int64)),
                        const(torch.tensor([iou_threshold], dtype=torch.float32)),
                        const(torch.tensor([0.0], dtype=torch.float32)))
        index = g.op('Gather', selected, const(torch.tensor(2)), axis_i=1)
        kept_scores = g.op('Gather', scores, index, axis_i=0)
        k = g.op('Min', g.op('Shape', kept_scores), const(torch.tensor([max_per_img], dtype=torch.int64)))
        top, order = g.op('TopK', kept_scores, k, axis_i=0, largest_i=1, sorted_i=1, outputs=2)
        index = g.op('Gather', index, order, axis_i=0)
        dets = g.op('Concat', g.op('Gather', boxes, index, axis_i=0),
                    g.op('Unsqueeze', top, const(torch.tensor([1]))), axis_i=1)
        return dets, g.op('Gather', labels, index, axis_i=0)


def check_decodable(head: nn.Module) -> None:
    """ValueError unless ``head`` decodes as :func:`decode_and_nms` writes it (RetinaNet-like anchor heads)."""
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
    name = type(head).__name__
    if type(head)._predict_by_feat_single is not BaseDenseHead._predict_by_feat_single:
        raise ValueError(f'{name} decodes with its own _predict_by_feat_single: NMS in the graph is written for '
                         f'anchor heads decoded by mmdet\'s BaseDenseHead (RetinaNet)')
    if not hasattr(head, 'prior_generator') or not getattr(head, 'use_sigmoid_cls', False):
        raise ValueError(f'{name}: NMS in the graph needs an anchor head with sigmoid scores (RetinaNet)')
    from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
    if type(head.bbox_coder) is not DeltaXYWHBBoxCoder or head.bbox_coder.use_box_type:
        raise ValueError(f'{name}: NMS in the graph decodes DeltaXYWHBBoxCoder tensors only, got '
                         f'{type(head.bbox_coder).__name__}')
    if getattr(head.loss_cls, 'custom_cls_channels', False):
        raise ValueError(f'{name}: custom class channels are not supported in the graph')
    nms = (head.test_cfg or {}).get('nms') or {}
    if nms.get('type', 'nms') != 'nms' or 'iou_threshold' not in nms:
        raise ValueError(f'{name}: test_cfg.nms must be plain nms with an iou_threshold for ONNX NonMaxSuppression, '
                         f'got {dict(nms)}')


def _decode(coder: Any, anchors: Tensor, deltas: Tensor, max_shape: Tuple[int, int]) -> Tensor:
    """``DeltaXYWHBBoxCoder.decode`` as mmdet runs it outside ONNX export (its export branch imports a module
    mmdet 3 no longer has)."""
    from mmdet.models.task_modules.coders.delta_xywh_bbox_coder import delta2bbox
    return delta2bbox(anchors, deltas, coder.means, coder.stds, max_shape, 16 / 1000, coder.clip_border,
                      coder.add_ctr_clamp, coder.ctr_clamp)


def decode_and_nms(head: nn.Module, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor],
                   img_shape: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """mmdet ``predict_by_feat`` of one image (batch 1) without rescaling: (dets N×5, labels N).

    Per level the ``nms_pre`` best (anchor, class) scores are taken with ``TopK`` (mmdet thresholds first and
    then sorts: the same set), decoded by the head's box coder clipped to ``img_shape``, then boxes below
    ``score_thr`` or ``min_bbox_size`` are marked and :class:`_MultiClassNMS` keeps ``max_per_img``.
    """
    cfg = head.test_cfg
    num_classes = head.cls_out_channels
    nms_pre = cfg.get('nms_pre', -1)
    priors = head.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores], dtype=cls_scores[0].dtype,
                                              device=cls_scores[0].device)
    boxes, scores, labels = [], [], []
    for cls, reg, anchors in zip(cls_scores, bbox_preds, priors):
        flat = cls[0].permute(1, 2, 0).reshape(-1).sigmoid()
        deltas = reg[0].permute(1, 2, 0).reshape(-1, head.bbox_coder.encode_size)
        k = flat.numel() if nms_pre <= 0 else min(nms_pre, flat.numel())
        top, index = flat.topk(k)
        anchor = torch.div(index, num_classes, rounding_mode='floor')
        boxes.append(_decode(head.bbox_coder, anchors[anchor], deltas[anchor], img_shape))
        scores.append(top)
        labels.append(index - anchor * num_classes)
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    valid = scores > cfg.get('score_thr', 0)
    min_size = cfg.get('min_bbox_size', -1)
    if min_size >= 0:
        valid = valid & (boxes[:, 2] - boxes[:, 0] > min_size) & (boxes[:, 3] - boxes[:, 1] > min_size)
    scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
    return _MultiClassNMS.apply(boxes, scores, labels, num_classes, float(cfg.nms.iou_threshold),
                                int(cfg.get('max_per_img', 100)), len(scores))


class WholeModel(nn.Module):
    """A detector/segmentor as one module with tensor inputs and the heads' raw outputs (see module doc)."""

    def __init__(self, model: nn.Module, nms: bool = False) -> None:
        super().__init__()
        self.model = model
        self.kind = model_kind(model)
        self.nms = nms
        if nms:
            if self.kind != 'single_stage':
                raise ValueError(f'NMS in the graph is written for single-stage detectors, not {self.kind} models')
            check_decodable(model.bbox_head)

    @property
    def input_names(self) -> List[str]:
        return ['input', 'rois'] if self.kind == 'two_stage' else ['input']

    def output_names(self, num_levels: int) -> List[str]:
        """Graph output names for a neck with ``num_levels`` outputs."""
        if self.kind == 'two_stage':
            return ([f'rpn_cls_{i}' for i in range(num_levels)] + [f'rpn_reg_{i}' for i in range(num_levels)]
                    + ['cls_score', 'bbox_pred'])
        if self.kind == 'single_stage':
            if self.nms:
                return ['dets', 'labels']
            return [f'cls_{i}' for i in range(num_levels)] + [f'reg_{i}' for i in range(num_levels)]
        return ['seg_logits']

    def forward(self, x: Tensor, rois: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        feats = self.model.extract_feat(x)
        if self.kind == 'segmentor':
            return (self.model.decode_head(feats),)
        if self.kind == 'single_stage':
            outs = self.model.bbox_head(feats)
            if len(outs) != 2:
                raise ValueError(f'{type(self.model.bbox_head).__name__} returns {len(outs)} outputs (score factors '
                                 'such as FCOS/ATSS centerness); whole-model export writes class scores and box '
                                 'deltas only')
            cls, reg = outs
            if self.nms:
                if x.shape[0] != 1:
                    raise ValueError(f'NMS in the graph takes one image, got a batch of {x.shape[0]}')
                return decode_and_nms(self.model.bbox_head, cls, reg, (int(x.shape[2]), int(x.shape[3])))
            return (*cls, *reg)
        cls, reg = self.model.rpn_head(feats)
        roi_head = self.model.roi_head
        if rois is None:
            raise ValueError('a two-stage detector needs rois (K x 5)')
        bbox_feats = extract_roi_features(roi_head.bbox_roi_extractor, feats, rois)
        if roi_head.with_shared_head:
            bbox_feats = roi_head.shared_head(bbox_feats)
        cls_score, bbox_pred = roi_head.bbox_head(bbox_feats)
        return (*cls, *reg, cls_score, bbox_pred)


def num_feature_levels(model: nn.Module, x: Tensor) -> int:
    return len(reference_outputs(MethodForward(model, 'extract_feat'), x))


def example_rois(x: Tensor, count: int = 8) -> Tensor:
    """``count`` boxes of growing size inside the image (several RoI levels), batch index 0: an export example."""
    h, w = x.shape[-2:]
    sizes = torch.linspace(0.1, 0.95, count)
    boxes = torch.stack([0.02 * w + 0 * sizes, 0.03 * h + 0 * sizes, 0.02 * w + sizes * 0.97 * w,
                         0.03 * h + sizes * 0.96 * h], 1)
    return torch.cat([torch.zeros(count, 1), boxes], 1)


# ---------------------------------------------------------------- Python side: decoding, NMS, data samples

class GraphRunner:
    """The raw outputs of a whole-model graph: onnxruntime (``path``) or a PyTorch module (``module``)."""

    def __init__(self, path: Optional[str] = None, module: Optional[nn.Module] = None) -> None:
        if (path is None) == (module is None):
            raise ValueError('give either an ONNX path or a module')
        self.module = module
        self.session = onnxruntime_session(path) if path is not None else None

    def __call__(self, x: Tensor, rois: Optional[Tensor] = None) -> List[Tensor]:
        if self.module is not None:
            return reference_outputs(self.module, (x,) if rois is None else (x, rois))
        feeds = {'input': x.detach().cpu().numpy()}
        if rois is not None:
            feeds['rois'] = rois.detach().cpu().float().numpy()
        return [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds)]


@contextlib.contextmanager
def _bbox_forward_from(roi_head: nn.Module, forward: Callable[[Tensor], Tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Let mmdet's ``roi_head.predict_bbox`` take its cls_score/bbox_pred from ``forward(rois)``."""
    roi_head._bbox_forward = lambda _x, rois: dict(zip(('cls_score', 'bbox_pred'), forward(rois)))
    try:
        yield
    finally:
        del roi_head._bbox_forward


class GraphPredictor:
    """Predictions of a whole-model graph, decoded with the model's own code: a predictor for ``evaluate``.

    ``model`` is the (fake-quant) model: only its data_preprocessor, heads' decoding (``predict_by_feat``),
    test_cfg and ``add_pred_to_datasample`` / ``postprocess_result`` are used; the numbers come from ``run``.
    """

    def __init__(self, model: nn.Module, run: GraphRunner, num_levels: int, nms: bool = False) -> None:
        self.model = model
        self.run = run
        self.kind = model_kind(model)
        self.num_levels = num_levels
        self.nms = nms

    def __call__(self, batch: dict) -> List[Any]:
        data = self.model.data_preprocessor(batch, False)
        x, samples = data['inputs'], data['data_samples']
        metas = [s.metainfo for s in samples]
        n = self.num_levels
        with torch.no_grad():
            if self.kind == 'segmentor':
                if self.model.test_cfg.get('mode', 'whole') != 'whole':
                    raise ValueError('only test_cfg.mode="whole" segmentors run from the graph')
                logits = self.run(x)[0]
                return self.model.postprocess_result(self.model.decode_head.predict_by_feat(logits, metas), samples)
            if self.kind == 'single_stage' and self.nms:
                return self.model.add_pred_to_datasample(samples, [_rescaled(*self.run(x), metas[0])])
            if self.kind == 'single_stage':
                out = self.run(x)
                results = self.model.bbox_head.predict_by_feat(out[:n], out[n:2 * n], batch_img_metas=metas,
                                                               rescale=True)
                return self.model.add_pred_to_datasample(samples, results)
            dummy = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])
            out = self.run(x, dummy)
            proposals = self.model.rpn_head.predict_by_feat(out[:n], out[n:2 * n], batch_img_metas=metas,
                                                            cfg=self.model.test_cfg.rpn, rescale=False)
            roi_head = self.model.roi_head
            with _bbox_forward_from(roi_head, lambda rois: tuple(self.run(x, rois)[2 * n:2 * n + 2])):
                results = roi_head.predict_bbox(None, metas, proposals, roi_head.test_cfg, rescale=True)
            return self.model.add_pred_to_datasample(samples, results)


def _rescaled(dets: Tensor, labels: Tensor, meta: dict) -> Any:
    """A graph's (dets, labels) of one image as mmdet's InstanceData, boxes rescaled to the original image."""
    from mmdet.structures.bbox import scale_boxes
    from mmengine.structures import InstanceData
    bboxes = scale_boxes(dets[:, :4], [1 / s for s in meta['scale_factor']])
    return InstanceData(bboxes=bboxes, scores=dets[:, 4], labels=labels.long())


def compare_detections(reference: Sequence[Any], other: Sequence[Any], box_tol: float = 1e-2,
                       score_tol: float = 1e-3) -> Dict[str, float]:
    """How many detections agree between two lists of mmdet data samples (same images, same order).

    A reference detection is matched when ``other`` has one with the same label, every box coordinate within
    ``box_tol`` pixels and the score within ``score_tol``. Returns counts (detections, and images whose
    detections all match both ways) and the largest differences of the matched pairs.
    """
    matched = total = extra = identical = 0
    max_box = max_score = 0.0
    for ref, oth in zip(reference, other):
        a, b = ref.pred_instances, oth.pred_instances
        total += len(a)
        extra += max(len(b) - len(a), 0)
        if not len(a) or not len(b):
            identical += len(a) == len(b)
            continue
        before = matched
        box_err = (a.bboxes[:, None, :] - b.bboxes[None, :, :]).abs().amax(-1)
        score_err = (a.scores[:, None] - b.scores[None, :]).abs()
        ok = (a.labels[:, None] == b.labels[None, :]) & (box_err <= box_tol) & (score_err <= score_tol)
        used = torch.zeros(len(b), dtype=torch.bool)
        for i in range(len(a)):
            candidates = torch.nonzero(ok[i] & ~used).flatten()
            if len(candidates):
                j = candidates[torch.argmin(box_err[i, candidates])]
                used[j] = True
                matched += 1
                max_box = max(max_box, float(box_err[i, j]))
                max_score = max(max_score, float(score_err[i, j]))
        identical += matched - before == len(a) == len(b)
    return {'images': len(reference), 'images_identical': identical, 'reference': total, 'matched': matched,
            'unmatched': total - matched, 'extra': extra, 'max_box_diff': max_box, 'max_score_diff': max_score}


def compare_segmentation(reference: Sequence[Any], other: Sequence[Any]) -> Dict[str, float]:
    """Pixels whose predicted class differs between two lists of mmseg data samples, images with none, and the
    largest absolute difference of their ``seg_logits`` (each image's, sorted: a few images with a value on a
    rounding boundary differ more than the rest)."""
    differ = total = identical = 0
    logit_diffs = []
    for ref, oth in zip(reference, other):
        a, b = ref.pred_sem_seg.data, oth.pred_sem_seg.data
        n = int((a != b).sum())
        differ += n
        identical += n == 0
        total += a.numel()
        if 'seg_logits' in ref and 'seg_logits' in oth:
            logit_diffs.append(float((ref.seg_logits.data - oth.seg_logits.data).abs().max()))
    return {'images': len(reference), 'images_identical': identical, 'pixels': total, 'differing': differ,
            'fraction': differ / max(total, 1), 'image_max_logit_diffs': sorted(logit_diffs)}
