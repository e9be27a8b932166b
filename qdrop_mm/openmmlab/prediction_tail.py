"""PD-Quant glue: what "the network's predictions" are for mmdet detectors and mmseg segmentors.

``predict_fn(model, batch, context)`` runs the data preprocessor, ``extract_feat`` and the heads'
forward (no post-processing except the FP proposals) and returns prediction rows for
``qdrop_mm.core.prediction_loss``:

- two-stage detectors (Faster / Mask R-CNN): the RPN's objectness (sigmoid, or softmax with the
  background last) and box deltas of every anchor on every level; with a ``StandardRoIHead``
  also its class scores (softmax, background last) and box deltas on the FP model's proposals
  (computed on the FP pass and handed back as ``context``, so quantized and FP rows are the same
  RoIs). Mask heads are not compared.
- single-stage detectors with an anchor-based or anchor-free dense head (RetinaNet, SSD, FCOS, ...):
  the head's class scores and box regressions per anchor (FCOS centerness is not compared).
- mmseg ``EncoderDecoder``: the decode head's logits per pixel (softmax over classes; sigmoid for
  ``out_channels == 1``); auxiliary heads (training only) are not compared.

Anything else is refused up front with one line naming the head (:func:`check_prediction_scope`), as are
heads in ``ptq.scope``: the tail runs them from a unit's output.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from qdrop_mm.core import PredictionGroup, PredictionSource

from .calibration import FEATURE_MODULES, preprocess_features

Groups = Tuple[List[PredictionGroup], List[Tensor]]


class UnsupportedHeadError(ValueError):
    """The model's heads have no prediction tail for PD-Quant."""


def dense_group(head: nn.Module, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor]) -> PredictionGroup:
    """Per-anchor rows of an mmdet dense head, all levels concatenated, in the head's own (A, C) channel order."""
    c = head.cls_out_channels
    scores, boxes = [], []
    for cls, box in zip(cls_scores, bbox_preds):
        anchors = cls.shape[1] // c
        scores.append(cls.permute(0, 2, 3, 1).reshape(-1, c))
        boxes.append(box.permute(0, 2, 3, 1).reshape(-1, box.shape[1] // anchors))
    sigmoid = bool(getattr(head, 'use_sigmoid_cls', False))
    return PredictionGroup(torch.cat(scores), 'sigmoid' if sigmoid else 'softmax', torch.cat(boxes),
                           None if sigmoid else c - 1)


def _standard_roi_head(model: nn.Module) -> Optional[nn.Module]:
    from mmdet.models.roi_heads import StandardRoIHead
    roi = getattr(model, 'roi_head', None)
    if isinstance(roi, StandardRoIHead) and roi.with_bbox and not roi.bbox_head.custom_cls_channels:
        return roi
    return None


def _two_stage(model: nn.Module, batch: Any, context: Optional[List[Tensor]]) -> Groups:
    from mmdet.structures.bbox import bbox2roi
    data, feats = preprocess_features(model, batch)
    cls_scores, bbox_preds = model.rpn_head(feats)
    groups = [dense_group(model.rpn_head, cls_scores, bbox_preds)]
    roi = _standard_roi_head(model)
    if roi is None:
        return groups, []
    if context is None:  # the FP pass: its proposals define the RoI rows of every later pass
        metas = [s.metainfo for s in data['data_samples']]
        proposals = model.rpn_head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=metas, rescale=False)
        context = [p.bboxes.detach() for p in proposals]
    out = roi._bbox_forward(feats, bbox2roi(context))
    groups.append(PredictionGroup(out['cls_score'], 'softmax', out['bbox_pred'], roi.bbox_head.num_classes))
    return groups, context


def _single_stage(model: nn.Module, batch: Any, context: Optional[List[Tensor]]) -> Groups:
    _, feats = preprocess_features(model, batch)
    return [dense_group(model.bbox_head, *model.bbox_head(feats)[:2])], []


def _segmentor(model: nn.Module, batch: Any, context: Optional[List[Tensor]]) -> Groups:
    _, feats = preprocess_features(model, batch)
    logits = model.decode_head(feats)
    rows = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    return [PredictionGroup(rows, 'sigmoid' if logits.shape[1] == 1 else 'softmax')], []


def select_predict_fn(model: nn.Module) -> Tuple[Callable[..., Groups], str]:
    """(predict_fn, a description of the heads compared) for ``model``; raises UnsupportedHeadError."""
    try:
        from mmdet.models.dense_heads import AnchorFreeHead, AnchorHead
        from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
    except ImportError:  # mmseg-only install: no detector can be here
        AnchorFreeHead = AnchorHead = SingleStageDetector = TwoStageDetector = type(None)
    dense = (AnchorHead, AnchorFreeHead)
    if isinstance(model, TwoStageDetector):
        if not (getattr(model, 'rpn_head', None) is not None and isinstance(model.rpn_head, dense)):
            raise UnsupportedHeadError(f'{type(model).__name__} without an anchor-based RPN head')
        roi = _standard_roi_head(model)
        what = f'rpn_head ({type(model.rpn_head).__name__})'
        if roi is not None:
            what += f' + roi_head bbox ({type(roi.bbox_head).__name__}, FP proposals)'
        return _two_stage, what
    if isinstance(model, SingleStageDetector):
        if not isinstance(model.bbox_head, dense):
            raise UnsupportedHeadError(f'{type(model.bbox_head).__name__} (supported single-stage heads: '
                                       f'AnchorHead / AnchorFreeHead subclasses such as RetinaHead, FCOSHead)')
        return _single_stage, f'bbox_head ({type(model.bbox_head).__name__})'
    try:
        from mmseg.models.segmentors import EncoderDecoder
    except ImportError:  # mmdet-only install
        EncoderDecoder = type(None)
    if isinstance(model, EncoderDecoder):
        if not isinstance(model.decode_head, nn.Module) or isinstance(model.decode_head, nn.ModuleList):
            raise UnsupportedHeadError(f'{type(model).__name__} with a cascade of decode heads')
        return _segmentor, f'decode_head ({type(model.decode_head).__name__})'
    raise UnsupportedHeadError(f'{type(model).__name__} (supported: mmdet two-stage and dense single-stage '
                               f'detectors, mmseg EncoderDecoder)')


def predict(model: nn.Module, batch: Any, context: Optional[List[Tensor]]) -> Groups:
    """The prediction rows of ``model`` on ``batch``, through the tail :func:`select_predict_fn` picks for it."""
    return select_predict_fn(model)[0](model, batch, context)


def check_prediction_scope(model: nn.Module, scope_paths: Sequence[str]) -> None:
    """Raise ValueError unless only backbone/neck modules are in scope (the tail runs the heads from a unit's
    output, so a head cannot be a unit) and :func:`select_predict_fn` has a tail for ``model``'s heads."""
    heads = [p for p in scope_paths if p.split('.')[0] not in FEATURE_MODULES]
    if heads:
        raise ValueError(f'reconstructs backbone and neck units only (its loss runs the heads from a unit\'s '
                         f'output); remove {heads} from ptq.scope or use another method')
    try:
        select_predict_fn(model)
    except UnsupportedHeadError as err:
        raise ValueError(f'no prediction tail for {err}; use another ptq.method') from None


PREDICTION_SOURCE = PredictionSource(predict, check=check_prediction_scope)
