"""Compare an exported graph with the PyTorch model: output errors and quantizer-by-quantizer agreement.

A quantized network is a step function: when two float implementations put a
value on opposite sides of a rounding boundary (summation order differs by
~1e-7 relative), that element moves by one activation step and every later
layer sees a different input. :func:`quantizer_agreement` finds the first
quantizer where onnxruntime and PyTorch disagree and by how many steps, which
tells a rounding-boundary case (a few elements, one step) from a real
mismatch (many elements, several steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .onnx_io import activation_qdq_outputs, reference_outputs, run_onnxruntime
from .onnx_qdq import QDQActivation, QDQLayer


@dataclass
class Parity:
    """Largest differences between reference and onnxruntime outputs, over all outputs."""

    max_abs: float
    max_rel: float
    mismatch_fraction: float
    numel: int

    def describe(self) -> str:
        return (f'max abs error {self.max_abs:.3g}, max relative error {self.max_rel:.3g} (of max |output|), '
                f'{self.mismatch_fraction:.3%} of {self.numel} elements differ by more than 1e-5 relative')


def compare_outputs(reference: Sequence[Tensor], outputs: Sequence[np.ndarray], rel_tol: float = 1e-5) -> Parity:
    """Max abs error, max error relative to each output's max |reference|, fraction of elements above rel_tol."""
    if len(reference) != len(outputs):
        raise ValueError(f'{len(reference)} reference outputs but {len(outputs)} onnxruntime outputs')
    max_abs = max_rel = 0.0
    above = numel = 0
    for ref, out in zip(reference, outputs):
        ref_np = ref.detach().cpu().numpy()
        if ref_np.shape != out.shape:
            raise ValueError(f'output shape {out.shape} differs from the reference {ref_np.shape}')
        err = np.abs(ref_np.astype(np.float64) - out.astype(np.float64))
        peak = max(float(np.abs(ref_np).max()) if ref_np.size else 0.0, 1e-12)
        max_abs = max(max_abs, float(err.max()) if err.size else 0.0)
        max_rel = max(max_rel, (float(err.max()) if err.size else 0.0) / peak)
        above += int((err > rel_tol * peak).sum())
        numel += err.size
    return Parity(max_abs, max_rel, above / max(numel, 1), numel)


def random_input(shape: Sequence[int], seed: int = 0) -> Tensor:
    """Seeded N(0, 1) input, the scale of a mean/std-normalised image."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class QuantizerAgreement:
    """One activation quantizer: how many of its outputs differ between onnxruntime and PyTorch, in steps."""

    name: str
    numel: int
    differing: int
    max_steps: float


def quantizer_agreement(path: str, module: nn.Module, x: Union[Tensor, Tuple[Tensor, ...]], optimization: str = 'all',
                        quantize_bias: bool = False) -> List[QuantizerAgreement]:
    """Per activation quantizer, in graph order: ``module`` (the export form that was exported) vs the graph.

    ``x``: the input, or a tuple of inputs (``module(*x)``, the graph's inputs in order)."""
    pairs = activation_qdq_outputs(path)
    if not pairs:
        return []
    names = dict(module.named_modules())
    captured: Dict[str, Tensor] = {}
    handles = []
    for name, _ in pairs:
        if not isinstance(names.get(name), QDQActivation):
            raise ValueError(f'graph quantizer {name!r} is not a QDQActivation of the given module')
        owner, _, attr = name.rpartition('.')
        # a QDQLayer applies its act_quantizer with quantize_after (no forward call): its output is the quantizer's
        hooked = names[owner] if attr == 'act_quantizer' and isinstance(names.get(owner), QDQLayer) else names[name]
        handles.append(hooked.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach())))
    try:
        reference_outputs(module, x)
    finally:
        for h in handles:
            h.remove()
    import onnx
    graph_outputs = [o.name for o in onnx.load(path).graph.output]
    extra = [o for _, o in pairs if o not in graph_outputs]
    values = dict(zip(graph_outputs + extra, run_onnxruntime(path, x, optimization, quantize_bias, extra)))
    result = []
    for name, output in pairs:
        steps = np.abs(values[output] - captured[name].numpy()) / float(names[name].scale)
        result.append(QuantizerAgreement(name, steps.size, int((steps > 0.5).sum()), float(steps.max())))
    return result


def first_divergence(agreement: Sequence[QuantizerAgreement]) -> Optional[QuantizerAgreement]:
    """The first quantizer (graph order) whose outputs differ, or None when all agree exactly."""
    return next((a for a in agreement if a.differing), None)
