"""Core entry point: calibrate activations, then reconstruct units stage by stage.

Plain PyTorch: the caller supplies the model, its ordered reconstruction
units (already replaced by quantized modules), calibration batches and a
``forward_fn(model, batch)`` that drives the model over one batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .capture import CallArgs, ForwardFn, capture_inputs
from .methods import MethodConfig, StageConfig
from .quant_state import act_quantizers, quant_state
from .reconstruct import ReconResult, reconstruct_unit
from .unit_cache import CachePolicy, UnitCache

if TYPE_CHECKING:  # pragma: no cover
    from .method_hooks import MethodHooks
    from .prediction_loss import PredictionSource


@dataclass
class Unit:
    """A reconstruction unit: a quantized module inside the model, in network order."""

    name: str
    module: nn.Module
    kind: str = 'layer'
    calls: int = 1  # per forward: a dense head's conv runs once per pyramid level, each call one cache entry


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
    """Everything a run did: the method, one record per (stage, unit) in order (restored ones included,
    then the method's own records, e.g. QwT's fits), and the units as the method ran them."""

    method: Dict[str, Any]
    records: List[UnitRecord] = field(default_factory=list)
    units: List[Unit] = field(default_factory=list)


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

    def restored(self, stage_idx: int, unit: Unit) -> Optional[UnitRecord]:
        """The record of this unit/stage when it is already done (restored on resume): it is not rerun."""
        return None

    def after_method_step(self, unit: Unit, record: Optional[UnitRecord], message: str) -> None:
        """A method's own step on ``unit`` after the stages (e.g. QwT's fit, ``record.stage`` = number of
        stages; not resumable) is done: ``record`` is its result, or None when the unit was skipped;
        ``message`` says what happened, in one line."""


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
                          units: Optional[Sequence['Unit']] = None) -> int:
    """Initialise every activation quantizer; returns how many.

    Without ``units``: from FP activations, all in one pass. With ``units`` (quantized-path
    calibration): one pass per unit, in order, observing that unit's quantizers while every earlier
    unit runs quantized (quantizers not yet calibrated pass their input through).
    """
    if units is None:
        return _observe(model, model, batches, forward_fn, quantized=False)
    return sum(_observe(model, u.module, batches, forward_fn, quantized=True) for u in units)


def _observe(model: nn.Module, scope: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn,
             quantized: bool) -> int:
    aqs = [q for q in act_quantizers(scope) if not q.is_calibrated]
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
                     correct_fp_input: Optional[Callable[[Tensor], Tensor]] = None, calls: int = 1) -> UnitCache:
    """Capture x_fp (all FP), x_q (earlier units quantized) and the FP targets of ``unit``.

    ``calls``: how often the forward calls ``unit`` per batch (one cache entry per call).

    ``correct_fp_input`` (PD-Quant's distribution correction) replaces each x_fp before it is
    stored; the targets are then the FP unit's outputs on the corrected inputs.
    """
    device = next(unit.buffers()).device
    cache = UnitCache(policy, device)

    def fp_sink(x: Tensor, call: CallArgs) -> None:
        cache.x_fp.append(x if correct_fp_input is None else correct_fp_input(x))
        cache.call_args.append(call)

    def q_sink(x: Tensor, call: CallArgs) -> None:
        if call != cache.call_args[len(cache.x_q)]:
            raise RuntimeError(f'{type(unit).__name__} was called with other arguments on the quantized path '
                               f'({call}) than on the FP path ({cache.call_args[len(cache.x_q)]})')
        cache.x_q.append(x)

    with quant_state(model, weight=False, act=False):
        capture_inputs(model, unit, batches, forward_fn, sink=fp_sink, calls=calls)
    with quant_state(model, weight=True, act=stage.act_quant, drop_prob=1.0):
        capture_inputs(model, unit, batches, forward_fn, sink=q_sink, calls=calls)
    with quant_state(unit, weight=False, act=False):
        for i, call in enumerate(cache.call_args):
            cache.target.append(call(unit, cache.x_fp.get(i, device)))
    cache.finalize()
    return cache


def run_ptq(model: nn.Module, units: Sequence[Unit], batches: Sequence[Any], forward_fn: ForwardFn,
            method: MethodConfig, callbacks: Optional[PTQCallbacks] = None,
            cache_policy: Optional[CachePolicy] = None,
            prediction: Optional['PredictionSource'] = None,
            hooks: Optional[Sequence['MethodHooks']] = None) -> PTQResult:
    """Quantize ``model`` in place with ``method`` and return what happened per unit.

    The method's hooks (``MethodConfig.build_hooks``: QwT's compensation, PD-Quant's prediction
    term) run at their points; ``prediction`` says how to get the network's predictions from a
    batch, for methods with a prediction term. ``hooks``: the method's hooks, built (and ``prepare``d on
    the FP model) by the caller before converting it; default ``method.build_hooks(prediction)``.
    Batch i of ``batches`` is cache entry i of every unit.
    The caller's ``units`` are not changed: ``result.units`` are the units as the method ran them.
    """
    cb = callbacks or PTQCallbacks()
    if not units:
        raise ValueError('no reconstruction units: nothing to quantize')
    model.eval()
    hooks = list(hooks) if hooks is not None else method.build_hooks(prediction)
    result = PTQResult(method.to_dict())
    try:
        run_units = list(units)
        for hook in hooks:
            run_units = hook.structure(model, run_units)
        result.units = run_units
        cb.before_calibration(len(act_quantizers(model)))
        calibrate_activations(model, batches, forward_fn, run_units if method.act_calibration == 'quantized' else None)
        cb.after_calibration()
        for hook in hooks:
            hook.start(model, run_units, batches, forward_fn, cache_policy)
        for stage_idx, stage in enumerate(method.stages):
            for unit in run_units:
                record = cb.restored(stage_idx, unit)
                if record is None:
                    cb.before_unit(stage_idx, unit)
                    record = _reconstruct(model, unit, stage_idx, stage, batches, forward_fn, hooks, cache_policy, cb)
                    cb.after_unit(record)
                result.records.append(record)
        for hook in hooks:
            hook.finalize(model, run_units, batches, forward_fn, cb, result)
    finally:
        for hook in hooks:
            hook.close()
    return result


def _reconstruct(model: nn.Module, unit: Unit, stage_idx: int, stage: StageConfig, batches: Sequence[Any],
                 forward_fn: ForwardFn, hooks: Sequence[Any], cache_policy: Optional[CachePolicy],
                 cb: PTQCallbacks) -> UnitRecord:
    correct = next((c for c in [h.input_correction(unit) for h in hooks] if c is not None), None)
    cache = build_unit_cache(model, unit.module, batches, forward_fn, stage, cache_policy, correct, unit.calls)
    try:
        recs = (hook.reconstruct(unit, cache, stage, cb.progress) for hook in hooks)
        rec = next((r for r in recs if r is not None), None)  # the first hook with its own loss
        rec = rec or reconstruct_unit(unit.module, cache, stage, progress=cb.progress)
    finally:
        cache.close()
    return UnitRecord(unit.name, unit.kind, stage_idx, rec, cache.num_bytes(), cache.usage())
