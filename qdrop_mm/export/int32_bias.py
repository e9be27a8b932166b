"""Conv/linear biases on the int32 grid that integer kernels use.

An integer conv (onnxruntime's QLinearConv, TensorRT's INT8 conv) adds the bias
to the int32 accumulator, so it holds round(b / (s_x·s_w)) with s_x the
input's scale and s_w the output channel's weight scale. onnxruntime's default
session (1.32, ``WeightBiasQuantization``) does that rounding itself on every
Conv whose input comes from a per-tensor DequantizeLinear **and whose output
goes straight into a QuantizeLinear** (a full DQ → Conv → Q unit; measured on
the demo Faster R-CNN: the 12 such convs get an int32 bias, the 12 convs with
a quantized input whose output is summed or left FP keep their float bias). A
float bias off that grid gives a different model from the one PyTorch
evaluated: on the demo Faster R-CNN W4A4 features the difference was 0.19
relative.

:func:`round_biases_to_int32_grid` moves the biases of exactly those layers of
a fake-quant model (in place) onto that grid: b' = float32(k · float32(s_x·s_w)),
k = round(float32(b / float32(s_x·s_w))), the float32 arithmetic onnxruntime
uses, so rounding again is the identity and the exported graph computes the
same thing with or without the pass, and as the integer kernels do. The scale
of each layer's input is found by running the export form once and following
every activation quantizer's output through grid-preserving modules
(MaxPool, Identity) to the layers it feeds; a layer's output goes straight into
a QuantizeLinear when the export writes its own output quantizer right after
the conv (:func:`requantized_layers`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from qdrop_mm.core.qmodules import QuantLayer

from .onnx_qdq import QDQActivation, QDQLayer, to_qdq

GRID_PRESERVING = (nn.MaxPool2d, nn.Identity)  # outputs lie on the input's grid (onnxruntime propagates DQ over them)
GRID_PRESERVING_OPS = ('MaxPool', 'Identity')
INT32_MAX = 2 ** 31 - 1


@dataclass
class BiasRounding:
    """One layer whose bias was moved onto its int32 grid."""

    name: str
    input_scale: float
    max_change: float  # largest |b' − b|
    max_change_steps: float  # largest |b' − b| / (s_x·s_w) over the channels (≤ 0.5 where float32 holds k exactly)


def layer_input_scales(exported: nn.Module, run: Callable[[nn.Module], object]) -> Dict[str, Tensor]:
    """{path of a QDQLayer: the per-tensor scale of its quantized input}, found while ``run(exported)`` runs.

    ``exported`` is an export form (:func:`to_qdq`); layers whose input is not on one activation quantizer's
    grid (a network input, a sum of two tensors, an upsampled map) are left out.
    """
    grid: Dict[int, Tuple[Tensor, Tensor]] = {}  # id(tensor) -> (tensor kept alive, scale)
    found: Dict[str, Tensor] = {}
    names = {m: n for n, m in exported.named_modules()}
    handles = []

    def mark(out, scale):
        if isinstance(out, Tensor):
            grid[id(out)] = (out, scale)

    def on_quantizer(module, _inputs, out):
        mark(out, module.scale)

    def on_layer_output(module, _inputs, out):
        if isinstance(module.act_quantizer, QDQActivation):
            mark(out, module.act_quantizer.scale)

    def on_layer_input(module, inputs):
        own = getattr(module, 'input_quantizer', None)
        if isinstance(own, QDQActivation):
            found[names[module]] = own.scale
        elif inputs and id(inputs[0]) in grid and grid[id(inputs[0])][0] is inputs[0]:
            found[names[module]] = grid[id(inputs[0])][1]

    def on_preserving(_module, inputs, out):
        if inputs and id(inputs[0]) in grid and grid[id(inputs[0])][0] is inputs[0]:
            mark(out, grid[id(inputs[0])][1])

    for module in exported.modules():
        if isinstance(module, QDQActivation):
            handles.append(module.register_forward_hook(on_quantizer))
        elif isinstance(module, QDQLayer):
            handles.append(module.register_forward_pre_hook(on_layer_input))
            handles.append(module.register_forward_hook(on_layer_output))
        elif isinstance(module, GRID_PRESERVING):
            handles.append(module.register_forward_hook(on_preserving))
    try:
        with torch.no_grad():
            run(exported)
    finally:
        for h in handles:
            h.remove()
    return found


def requantized_layers(exported: nn.Module) -> List[str]:
    """Paths of the QDQLayers of an export form whose conv/linear output goes straight into a QuantizeLinear.

    That is a layer with its own output quantizer in the fusable placement (``requantize``, activation ReLU
    or none, no norm between conv and quantizer; see :meth:`~.onnx_qdq.QDQActivation.quantize_after`).
    """
    return [name for name, m in exported.named_modules()
            if isinstance(m, QDQLayer) and isinstance(m.act_quantizer, QDQActivation) and m.requantize
            and m.norm is None and (m.activation is None or isinstance(m.activation, nn.ReLU))]


def grid_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """``bias`` on the grid float32(s_x·s_w) per output channel, computed in float32 as onnxruntime does."""
    step = input_scale.float().reshape(()) * weight_scale.float().reshape(-1)
    k = torch.round(bias.float() / step)
    if k.abs().max() > INT32_MAX:
        raise ValueError(f'bias / (s_x*s_w) exceeds the int32 range (max {float(k.abs().max()):.3g})')
    return (k * step).to(bias.dtype)


def round_biases_to_int32_grid(model: nn.Module, run: Callable[[nn.Module], object],
                               scales: Optional[Dict[str, Tensor]] = None,
                               requantized: Optional[List[str]] = None) -> List[BiasRounding]:
    """Move, in place, onto its int32 grid the bias of every QuantLayer of ``model`` whose input is quantized and
    whose output goes straight into a QuantizeLinear in the export (the biases onnxruntime rounds).

    ``run`` gets the export form of ``model`` and must run one forward pass through it (any input: only which
    quantizer feeds which layer is recorded), e.g. ``lambda m: m.extract_feat(x)``. Returns what changed; a
    second call changes nothing (max_change 0). ``scales`` (:func:`layer_input_scales`) and ``requantized``
    (:func:`requantized_layers`): when already known.
    """
    if scales is None or requantized is None:
        probe = to_qdq(model)[0]
        scales = layer_input_scales(probe, run) if scales is None else scales
        requantized = requantized_layers(probe) if requantized is None else requantized
    layers = dict(model.named_modules())
    result = []
    for name, s_x in scales.items():
        if name not in requantized:
            continue
        layer = layers.get(name)
        if not isinstance(layer, QuantLayer):
            raise ValueError(f'{name}: export form and model disagree (not a QuantLayer in the model)')
        s_w = layer.weight_quantizer.scale.detach()
        new = grid_bias(layer.bias.detach(), s_x, s_w)
        change = (new - layer.bias).abs()
        steps = change / (s_x.float() * s_w.float().reshape(-1))
        layer.bias.data.copy_(new)
        result.append(BiasRounding(name, float(s_x), float(change.max()) if change.numel() else 0.0,
                                   float(steps.max()) if steps.numel() else 0.0))
    return result


def off_grid_biases(path: str) -> List[Tuple[str, float]]:
    """(bias initializer, max |b − rounded b| relative to s_x·s_w) for every Conv/Gemm of the graph at ``path``
    whose input is a per-tensor DequantizeLinear, whose weight is a per-channel or per-tensor
    DequantizeLinear and whose output goes only into QuantizeLinear, where the float bias is not a fixed point
    of onnxruntime's int32 rounding."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    bad = []
    for node in graph.node:
        if node.op_type not in ('Conv', 'Gemm') or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if {n.op_type for n in graph.node if node.output[0] in n.input} != {'QuantizeLinear'}:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        while dq_x is not None and dq_x.op_type in GRID_PRESERVING_OPS:
            dq_x = producer.get(dq_x.input[0])
        if dq_x is None or dq_w is None or dq_x.op_type != 'DequantizeLinear' or dq_w.op_type != 'DequantizeLinear':
            continue
        s_x = inits.get(dq_x.input[1])
        s_w = inits.get(dq_w.input[1])
        if s_x is None or s_w is None or s_x.size != 1:
            continue
        bias = inits[node.input[2]].astype(np.float32)
        step = (np.float32(s_x.reshape(())) * s_w.astype(np.float32).reshape(-1)).astype(np.float32)
        again = (np.round(bias / step).astype(np.float32) * step).astype(np.float32)
        err = float(np.max(np.abs(again - bias) / step)) if bias.size else 0.0
        if err > 0:
            bad.append((node.input[2], err))
    return bad


def describe_rounding(changes: List[BiasRounding]) -> str:
    """One line: how many biases moved and by how much at most."""
    if not changes:
        return 'no layer has a quantized input: no bias moved'
    worst = max(changes, key=lambda c: c.max_change)
    return (f'{len(changes)} biases on the int32 grid s_x*s_w (largest change {worst.max_change:.3g} in '
            f'{worst.name}, at most {max(c.max_change_steps for c in changes):.2f} grid steps)')
