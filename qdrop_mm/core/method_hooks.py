"""What a method adds to the reconstruction loop, as hooks ``run_ptq`` calls at fixed points.

QDrop, BRECQ, AdaRound and RTN are settings of the loop (``methods.py``); a method that adds
structure or a loss term (QwT in ``qwt.py``, PD-Quant in ``prediction_loss.py``) is one subclass of
:class:`MethodHooks`, built by its config's ``build_hooks``; the loop has no branch for either.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .capture import ForwardFn
    from .methods import StageConfig
    from .prediction_loss import InputCorrection
    from .ptq import PTQCallbacks, PTQResult, Unit
    from .reconstruct import ProgressFn, ReconResult
    from .unit_cache import CachePolicy, UnitCache


class MethodHooks:
    """No-op hooks; a method overrides those it needs.

    Order: ``check`` (before any data is read), ``prepare`` (before the caller converts the model),
    ``structure`` (before calibration), ``start`` (after it), per unit and stage ``input_correction`` then
    ``reconstruct``, after all stages ``finalize`` then ``report``, and ``close`` always.
    """

    def check(self, model: nn.Module, scope_paths: Sequence[str]) -> None:
        """Raise ``ValueError`` (one line) when the method cannot run on ``model`` with these modules in scope."""

    def prepare(self, model: nn.Module) -> None:
        """Once, on the FP model before its layers are replaced by quantized ones (e.g. keep an FP copy)."""

    def structure(self, model: nn.Module, units: List['Unit']) -> List['Unit']:
        """The units as the method runs them (e.g. wrapped in place inside ``model``)."""
        return units

    def start(self, model: nn.Module, units: Sequence['Unit'], batches: Sequence[Any], forward_fn: 'ForwardFn',
              cache_policy: Optional['CachePolicy']) -> None:
        """Once, after calibration, before the first unit."""

    def input_correction(self, unit: 'Unit') -> Optional['InputCorrection']:
        """A transform of the unit's cached FP inputs (None: keep them)."""
        return None

    def reconstruct(self, unit: 'Unit', cache: 'UnitCache', stage: 'StageConfig',
                    progress: Optional['ProgressFn']) -> Optional['ReconResult']:
        """The unit's reconstruction with the method's loss (None: the plain ``reconstruct_unit``)."""
        return None

    def finalize(self, model: nn.Module, units: Sequence['Unit'], batches: Sequence[Any], forward_fn: 'ForwardFn',
                 callbacks: 'PTQCallbacks', result: 'PTQResult') -> None:
        """After every stage (e.g. fit a closed-form compensation), adding records to ``result``."""

    def report(self, result: 'PTQResult') -> Dict[str, Any]:
        """Entries the method adds to the run's report (e.g. per-unit values of its own loss)."""
        return {}

    def close(self) -> None:
        """Release what ``start`` allocated (also after a failure)."""
