"""Export a saved quantized model to ONNX, check it in onnxruntime, evaluate the graph: what ``qdrop-export-onnx`` runs.

:func:`export` rebuilds the quantized model (:func:`qdrop_mm.api.build_quantized_model`), moves the biases
onto the int32 grid (:func:`~.prepare.prepare_export`), writes the QDQ graph of ``extract_feat`` (backbone +
neck) or, with ``whole=True``, of the whole model with its heads' raw outputs (:mod:`.whole`), and optionally
compares it with the PyTorch model (``check``) and evaluates both on the config's test split (``evaluate``).
"""
from __future__ import annotations

import os.path as osp
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .evaluate import evaluate
from .int32_bias import describe_rounding
from .onnx_io import MethodForward, export_onnx, qdq_node_counts, reference_outputs, require_onnx, run_onnxruntime
from .parity import compare_outputs, first_divergence, quantizer_agreement, random_input
from .prepare import prepare_export
from .whole import (ROI_ALIGN_OPSET, GraphPredictor, GraphRunner, WholeModel, compare_detections,
                    compare_segmentation, example_rois, model_kind, num_feature_levels)

DEFAULT_SHAPE = (1, 3, 800, 1344)


def output_path(quantized: str, out: Optional[str] = None, whole: bool = False) -> str:
    """``out``, or ``<quantized without .pth>_qdq.onnx`` (``_whole_qdq.onnx`` for the whole model)."""
    return out or osp.splitext(quantized)[0] + ('_whole_qdq.onnx' if whole else '_qdq.onnx')


def image_input(cfg: Any, model: torch.nn.Module, path: str) -> torch.Tensor:
    """A real image as the model sees it: the config's test pipeline (no annotations), then data_preprocessor."""
    from mmengine.dataset import Compose
    steps = [t for t in cfg.test_dataloader.dataset.pipeline if 'LoadAnnotations' not in t['type']]
    data = Compose(steps)(dict(img_path=path, img_id=0))
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
    return batch['inputs']


def input_tensor(cfg: Any, model: torch.nn.Module, input_shape: Optional[Sequence[int]] = None,
                 check_image: Optional[str] = None) -> torch.Tensor:
    """The export/check input: ``check_image`` preprocessed, else a seeded random tensor of ``input_shape``."""
    if check_image is None:
        return random_input(tuple(input_shape or DEFAULT_SHAPE))
    x = image_input(cfg, model, check_image)
    if input_shape is not None and tuple(input_shape) != tuple(x.shape):
        raise ValueError(f'--input-shape {list(input_shape)} differs from the preprocessed --check-image shape '
                         f'{list(x.shape)}: leave --input-shape out, or export with --dynamic')
    return x


def export(config: str, quantized: str, out: Optional[str] = None, *, input_shape: Optional[Sequence[int]] = None,
           dynamic: bool = False, opset: int = 17, check: bool = False, check_image: Optional[str] = None,
           activation_storage: str = 'int8', float_bias: bool = False, whole: bool = False,
           evaluate_images: Optional[int] = None, nms: bool = False, cfg_options: Optional[Dict[str, Any]] = None,
           log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Write the QDQ graph of ``quantized`` to ``out``; returns what was written and measured.

    ``whole``: the whole model (heads' raw outputs, see :mod:`.whole`; opset >= 16 for two-stage RoI heads),
    else ``extract_feat``; ``nms`` (whole single-stage detectors, static shape, batch 1): box decoding and NMS in
    the graph, outputs ``dets`` and ``labels``. ``check``/``check_image``: compare the graph in onnxruntime with
    the PyTorch fake-quant model (with the same int32-grid biases) on a random input / an image.
    ``evaluate_images`` (whole only; 0 = the whole test split): the config's metric for the PyTorch model and for
    the graph in onnxruntime's default session, one image per run, and how many detections agree.
    """
    from qdrop_mm.api import build_quantized_model
    require_onnx()
    cfg, model = build_quantized_model(config, quantized, cfg_options)
    if not hasattr(model, 'extract_feat'):
        raise ValueError(f'{type(model).__name__} has no extract_feat: only detectors and segmentors are supported')
    if evaluate_images is not None and not whole:
        raise ValueError('--evaluate needs --whole (the metric needs the heads)')
    if nms and (not whole or dynamic):
        raise ValueError('--nms needs --whole and a static input shape (no --dynamic)')
    x = input_tensor(cfg, model, input_shape, check_image)
    out = output_path(quantized, out, whole)
    result: Dict[str, Any] = {'out': out, 'parity': None, 'model': model, 'cfg': cfg}
    if whole:
        reference = WholeModel(model, nms)
        if reference.kind == 'two_stage' and opset < ROI_ALIGN_OPSET:
            raise ValueError(f'--opset must be >= {ROI_ALIGN_OPSET} for a two-stage detector (RoiAlign), got {opset}')
        example = (x, example_rois(x)) if reference.kind == 'two_stage' else (x,)
        prepared = prepare_export(model, lambda m: WholeModel(m)(*example), activation_storage, not float_bias)
        graph_module = WholeModel(prepared.module, nms)
        levels = num_feature_levels(model, x)
        names = reference.output_names(levels)
        axes = ({'rois': {0: 'num_rois'}, 'cls_score': {0: 'num_rois'}, 'bbox_pred': {0: 'num_rois'}}
                if reference.kind == 'two_stage' else {'dets': {0: 'num_dets'}, 'labels': {0: 'num_dets'}} if nms
                else None)
        export_onnx(graph_module, example, out, opset=opset, dynamic=dynamic, input_names=graph_module.input_names,
                    output_names=names, dynamic_axes=axes)
        what = f'the whole {type(model).__name__} ({reference.kind}): outputs {", ".join(names)}'
        result.update(kind=reference.kind, levels=levels, output_names=names)
    else:
        example = (x,)
        prepared = prepare_export(model, lambda m: m.extract_feat(x), activation_storage, not float_bias)
        graph_module = MethodForward(prepared.module, 'extract_feat')
        reference = MethodForward(model, 'extract_feat')
        export_onnx(graph_module, x, out, opset=opset, dynamic=dynamic)
        what = 'outputs = extract_feat (backbone + neck)'
    summary = prepared.summary
    nodes = qdq_node_counts(out)
    result.update(summary=summary, nodes=nodes, biases=prepared.biases)
    log(f'wrote {out}: input {list(x.shape)} (preprocessed image), {what}')
    log(f'  {summary.describe()}')
    if not float_bias:
        log(f'  {describe_rounding(prepared.biases)}')
    log(f'  graph: {nodes.get("QuantizeLinear", 0)} QuantizeLinear, {nodes.get("DequantizeLinear", 0)} '
        f'DequantizeLinear, {nodes.get("Clip", 0)} Clip')
    if summary.uint8_tensors:
        log(f'  note: {len(summary.uint8_tensors)} tensor(s) stored as UINT8: valid ONNX and exact in onnxruntime, '
            f'but TensorRT takes only INT8 with zero point 0, e.g. {summary.uint8_tensors[:3]}')
    if check or check_image:
        source = check_image or 'seeded random input'
        ref = reference_outputs(reference, example)
        result['parity'] = compare_outputs(ref, run_onnxruntime(out, example))
        result['parity_bias_int32'] = compare_outputs(ref, run_onnxruntime(out, example, quantize_bias=True))
        log(f'onnxruntime vs PyTorch fake-quant ({source}): {result["parity"].describe()}')
        log(f'  onnxruntime default session (rounds conv biases to int32 at scale s_x*s_w'
            f'{"" if float_bias else ": already on that grid"}): {result["parity_bias_int32"].describe()}')
        result['agreement'] = quantizer_agreement(out, graph_module, example)
        first = first_divergence(result['agreement'])
        if first is None:
            log(f'  all {len(result["agreement"])} activation quantizers give identical integers')
        else:
            log(f'  first activation quantizer that differs: {first.name.removeprefix("model.")}, {first.differing} '
                f'of {first.numel} elements, at most {first.max_steps:.0f} step(s); a few one-step differences are '
                f'values on a rounding boundary under a different float summation order, and later layers inherit them')
    if evaluate_images is not None:
        result['evaluation'] = evaluate_graph(cfg, model, out, result['levels'], evaluate_images or None, nms)
        log(describe_evaluation(result['evaluation']))
    return result


def evaluate_graph(cfg: Any, model: torch.nn.Module, path: str, num_levels: int,
                   max_images: Optional[int] = None, nms: bool = False) -> Dict[str, Any]:
    """The config's metric for ``model`` (PyTorch, ``test_step``) and for the whole-model graph at ``path`` in
    onnxruntime's default session (decoded by :class:`~.whole.GraphPredictor`), on the same images, one per
    run, and how far their predictions agree (:func:`~.whole.compare_detections` / ``compare_segmentation``)."""
    graph = GraphPredictor(model, GraphRunner(path), num_levels, nms)
    metrics, kept = evaluate(cfg, {'pytorch': model.test_step, 'onnxruntime': graph}, max_images=max_images,
                             batch_size=1)
    compare = compare_segmentation if model_kind(model) == 'segmentor' else compare_detections
    return {'metrics': metrics, 'agreement': compare(kept['pytorch'], kept['onnxruntime']),
            'images': len(kept['pytorch'])}


def describe_evaluation(evaluation: Dict[str, Any]) -> str:
    """Lines: each predictor's metrics and the prediction agreement."""
    lines = [f'evaluation on {evaluation["images"]} test images (the config\'s evaluator):']
    for name, metrics in evaluation['metrics'].items():
        main = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        lines.append(f'  {name}: {main}')
    agreement = dict(evaluation['agreement'])
    diffs = agreement.pop('image_max_logit_diffs', None)
    lines.append(f'  predictions, onnxruntime default session vs PyTorch: {agreement}')
    if diffs:
        lines.append(f'  largest |seg_logits difference| per image: min {diffs[0]:.3g}, median '
                     f'{diffs[len(diffs) // 2]:.3g}, max {diffs[-1]:.3g}; {sum(d <= 1e-5 for d in diffs)} of '
                     f'{len(diffs)} images within 1e-5')
    return '\n'.join(lines)
