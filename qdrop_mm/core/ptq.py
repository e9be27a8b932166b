"""Core entry point: calibrate activations, then reconstruct units stage by stage.

Plain PyTorch: the caller supplies the model, its ordered reconstruction
units (already replaced by quantized modules), calibration batches and a
``forward_fn(model, batch)`` that drives the model over one batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .capture import ForwardFn, capture_inputs
from .methods import MethodConfig, StageConfig
from .prediction_loss import InputCorrection, PredictionSource, PredictionTerm
from .qwt import fit_compensation, wrap_units
from .lsq import LSQActQuantizer
from .quant_state import act_quantizers, quant_state
from .reconstruct import ReconResult, reconstruct_unit
from .unit_cache import CachePolicy, UnitCache


@dataclass
class Unit:
    """A reconstruction unit: a quantized module inside the model, in network order."""

    name: str
    module: nn.Module
    kind: str = 'layer'


@dataclass
class UnitRecord:
    name: str
    kind: str
    stage: int
    result: ReconResult
    cache_bytes: int
    cache_usage: Dict[str, int] = field(default_factory=dict)


@dataclass
class PTQResult:
    method: Dict[str, Any]
    records: List[UnitRecord] = field(default_factory=list)


class PTQCallbacks:
    """No-op hooks around the phases; subclass to log, report or checkpoint."""

    def before_calibration(self, num_quantizers: int) -> None:
        pass

    def after_calibration(self) -> None:
        pass

    def before_unit(self, stage_idx: int, unit: Unit) -> None:
        pass

    def progress(self, it: int, total: int, loss: float) -> None:
        pass

    def after_unit(self, record: UnitRecord) -> None:
        pass

    def should_skip(self, stage_idx: int, unit: Unit) -> bool:
        """True when this unit/stage is already done (e.g. restored on resume)."""
        return False

    def after_compensation(self, record: UnitRecord) -> None:
        """A unit's QwT compensation was fitted (``record.stage`` = number of stages; not resumable)."""
        pass

    def compensation_not_possible(self, unit: Unit) -> None:
        """QwT cannot compensate ``unit`` (its input/output are not NCHW maps a strided 1x1 conv can map)."""
        pass


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                          units: Optional[Sequence['Unit']] = None) -> int:
    """Initialise every activation quantizer; returns how many.

    Without ``units``: from FP activations, all in one pass. With ``units`` (quantized-path
    calibration): one pass per unit, in order, observing that unit's quantizers while every earlier
    unit runs quantized (quantizers not yet calibrated pass their input through).
    """
    if units is None:
        return _observe(model, [q for q in act_quantizers(model) if not q.is_calibrated], batches, forward_fn,
                        quantized=False)
    return sum(_observe(model, [q for q in act_quantizers(u.module) if not q.is_calibrated], batches, forward_fn,
                        quantized=True) for u in units)


def _observe(model: nn.Module, aqs: List[LSQActQuantizer], batches: Sequence[Any], forward_fn: ForwardFn,
             quantized: bool) -> int:
    if not aqs:  # all restored (resume) or already calibrated: no forward pass needed
        return 0
    for q in aqs:
        q.start_observing()
    try:
        with quant_state(model, weight=quantized, act=quantized, drop_prob=1.0 if quantized else None):
            for batch in batches:
                forward_fn(model, batch)
    finally:
        for q in aqs:
            q.observing = False
    for q in aqs:
        q.finish_observing()
    return len(aqs)


@torch.no_grad()
def build_unit_cache(model: nn.Module, unit: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                     stage: StageConfig, policy: Optional[CachePolicy] = None,
                     correct_fp_input: Optional[InputCorrection] = None) -> UnitCache:
    """Capture x_fp (all FP), x_q (earlier units quantized) and the FP targets of ``unit``.

    ``correct_fp_input`` (PD-Quant's distribution correction) replaces each x_fp before it is
    stored; the targets are then the FP unit's outputs on the corrected inputs.
    """
    device = next(unit.buffers()).device
    cache = UnitCache(policy, device)
    sink = cache.x_fp.append if correct_fp_input is None else lambda x: cache.x_fp.append(correct_fp_input(x))
    with quant_state(model, weight=False, act=False):
        capture_inputs(model, unit, batches, forward_fn, sink=sink)
    with quant_state(model, weight=True, act=stage.act_quant, drop_prob=1.0):
        capture_inputs(model, unit, batches, forward_fn, sink=cache.x_q.append)
    with quant_state(unit, weight=False, act=False):
        for i in range(len(cache.x_fp)):
            cache.target.append(unit(cache.x_fp.get(i, device)))
    cache.finalize()
    return cache


def run_ptq(model: nn.Module, units: Sequence[Unit], batches: Sequence[Any], forward_fn: ForwardFn,
            method: MethodConfig, callbacks: Optional[PTQCallbacks] = None,
            cache_policy: Optional[CachePolicy] = None,
            prediction: Optional[PredictionSource] = None) -> PTQResult:
    """Quantize ``model`` in place with ``method`` and return what happened per unit.

    With ``method.prediction`` (PD-Quant) ``prediction`` must say how to get the network's
    predictions from a batch (and, for distribution correction, each unit's FP module);
    batch i of ``batches`` is cache entry i of every unit.

    With ``method.compensation`` every unit is first wrapped in place in a
    ``qwt.Compensated`` (``unit.module`` is updated), and after all stages the
    compensations are fitted in unit order; that pass always runs whole.
    """
    cb = callbacks or PTQCallbacks()
    if not units:
        raise ValueError('no reconstruction units: nothing to quantize')
    model.eval()
    if method.compensation is not None:
        for unit, wrapper in zip(units, wrap_units(model, [u.module for u in units], method.compensation.placement)):
            unit.module = wrapper
    cb.before_calibration(len(act_quantizers(model)))
    calibrate_activations(model, batches, forward_fn, units if method.act_calibration == 'quantized' else None)
    cb.after_calibration()
    pd_term = None
    if method.prediction is not None:
        if prediction is None:
            raise ValueError(f'method {method.name!r} has a prediction term: pass run_ptq(prediction='
                             f'PredictionSource(predict_fn, fp_unit)) saying how to get the network predictions')
        pd_term = PredictionTerm(model, [(u.name, u.module) for u in units], batches, prediction,
                                 method.prediction, cache_policy)
    result = PTQResult(method.to_dict())
    for stage_idx, stage in enumerate(method.stages):
        for unit in units:
            if cb.should_skip(stage_idx, unit):
                continue
            cb.before_unit(stage_idx, unit)
            cache = build_unit_cache(model, unit.module, batches, forward_fn, stage, cache_policy,
                                     pd_term.input_correction(unit.name) if pd_term else None)
            try:
                rec = pd_term.reconstruct(unit.module, cache, stage, cb.progress) if pd_term else \
                    reconstruct_unit(unit.module, cache, stage, progress=cb.progress)
            finally:
                cache.close()
            record = UnitRecord(unit.name, unit.kind, stage_idx, rec, cache.num_bytes(), cache.usage())
            result.records.append(record)
            cb.after_unit(record)
    if pd_term is not None:
        pd_term.close()
    if method.compensation is not None:
        for unit in units:
            fit = fit_compensation(model, unit.module, batches, forward_fn, method.compensation.ridge,
                                   method.compensation.validate)
            if fit is not None:
                record = UnitRecord(unit.name, unit.kind, len(method.stages), fit, 0)
                result.records.append(record)
                cb.after_compensation(record)
            else:
                cb.compensation_not_possible(unit)
    return result
