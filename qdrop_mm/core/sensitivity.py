"""Per-unit sensitivity: how much a network's outputs move when only one unit is quantized.

Plain PyTorch. The quantizers must be ready (weights on their grid, activation steps calibrated);
the measurement only switches them on and off, so it works for RTN as well as for a reconstructed model.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .capture import ForwardFn, tensors_in
from .ptq import Unit
from .quant_state import quant_state

ProgressFn = Callable[[int, int, str, float], None]  # (done, total, unit name, its error)


@dataclass
class SensitivityResult:
    """Relative output error ||F_q - F||² / ||F||² summed over all output tensors and batches.

    ``unit_errors``: only that part's quantizers on; ``all_units_error``: the quantizers of every part on.
    """

    unit_errors: Dict[str, float] = field(default_factory=dict)
    all_units_error: float = float('nan')


@torch.no_grad()
def relative_output_error(model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                          reference: Sequence[List[Tensor]]) -> float:
    """Σ||out - ref||² / Σ||ref||² over ``batches`` with the model's current quantizer state."""
    err, ref = (torch.zeros((), dtype=torch.float64) for _ in range(2))
    for batch, fp in zip(batches, reference):
        out = tensors_in(forward_fn(model, batch))
        if len(out) != len(fp):
            raise ValueError(f'forward_fn returned {len(out)} tensors, the FP reference has {len(fp)}')
        for q, f in zip(out, fp):
            err += (q.double() - f.double()).pow(2).sum().cpu()
            ref += f.double().pow(2).sum().cpu()
    return err.item() / max(ref.item(), 1e-30)


@torch.no_grad()
def fp_outputs(model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn) -> List[List[Tensor]]:
    """The output tensors of every batch with all quantizers off: the reference the errors are taken against."""
    with quant_state(model, weight=False, act=False):
        return [tensors_in(forward_fn(model, b)) for b in batches]


@torch.no_grad()
def quantized_error(model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                    reference: Optional[Sequence[List[Tensor]]] = None) -> float:
    """Relative output error of the fully quantized model (no drop) against FP (``reference`` or computed)."""
    reference = fp_outputs(model, batches, forward_fn) if reference is None else reference
    with quant_state(model, weight=True, act=True, drop_prob=1.0):
        return relative_output_error(model, batches, forward_fn, reference)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, parts: Sequence[Unit], batches: Sequence[Any], forward_fn: ForwardFn,
                        progress: Optional[ProgressFn] = None) -> SensitivityResult:
    """Output error of ``model`` with each part quantized alone, and with all parts quantized, against FP.

    A part is a unit, or any module holding quantizers by a name (e.g. one activation quantizer: its cost
    with the weights FP); quantizers outside the parts stay off throughout.
    """
    model.eval()
    result = SensitivityResult()
    reference = fp_outputs(model, batches, forward_fn)
    with quant_state(model, weight=False, act=False):
        for i, part in enumerate(parts):
            with quant_state(part.module, weight=True, act=True, drop_prob=1.0):
                result.unit_errors[part.name] = relative_output_error(model, batches, forward_fn, reference)
            if progress is not None:
                progress(i + 1, len(parts), part.name, result.unit_errors[part.name])
        with all_quantized(parts):
            result.all_units_error = relative_output_error(model, batches, forward_fn, reference)
    return result


@contextmanager
def all_quantized(parts: Sequence[Unit]) -> Iterator[None]:
    """Every quantizer of ``parts`` on (no drop) within the block, restored on exit."""
    with ExitStack() as stack:
        for part in parts:
            stack.enter_context(quant_state(part.module, weight=True, act=True, drop_prob=1.0))
        yield
