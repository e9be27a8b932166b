"""One call from a fake-quant model to the export form that runtimes compute exactly: :func:`prepare_export`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List

import torch
from torch import nn

from qdrop_mm.core.qmodules import QuantLayer

from .int32_bias import BiasRounding, layer_input_scales, requantized_layers, round_biases_to_int32_grid
from .onnx_qdq import QDQOptions, QDQSummary, integer_weight, to_qdq


@dataclass
class PreparedExport:
    """The export form, what was written, the biases moved onto the int32 grid and the FP32-weight layers."""

    module: nn.Module
    summary: QDQSummary
    biases: List[BiasRounding] = field(default_factory=list)
    float_weights: List[str] = field(default_factory=list)


def prepare_export(model: nn.Module, run: Callable[[nn.Module], object], activation_storage: str = 'int8',
                   int32_bias: bool = True) -> PreparedExport:
    """Export form of ``model`` for ONNX; with ``int32_bias`` the biases of ``model`` itself move onto the int32 grid.

    ``run(module)`` runs one forward pass (e.g. ``lambda m: m.extract_feat(x)``); it finds which activation
    quantizer feeds which layer. ``int32_bias`` (default) rounds, in place, the bias of every layer with a
    quantized input whose output goes straight into a QuantizeLinear to round(b / (s_x·s_w))·s_x·s_w, what
    integer kernels and onnxruntime's default session compute, so ``model`` and the graph agree (see
    :mod:`.int32_bias`). A layer whose 8-bit weights need a
    UINT8 zero point and whose input is not quantized (the stem) gets its weights as FP32 constants: such a
    conv runs in floating point in any runtime, and every zero point left in the graph is 0 (TensorRT).
    """
    probe, _ = to_qdq(model, QDQOptions(activation_storage=activation_storage))
    scales = layer_input_scales(probe, run)
    biases = round_biases_to_int32_grid(model, run, scales, requantized_layers(probe)) if int32_bias else []
    float_weights = sorted(name for name, m in model.named_modules()
                           if isinstance(m, QuantLayer) and name not in scales
                           and integer_weight(m)[0].dtype != torch.int8)
    module, summary = to_qdq(model, QDQOptions(activation_storage=activation_storage,
                                               float_weights=frozenset(float_weights)))
    return PreparedExport(module, summary, biases, float_weights)
