"""PD-Quant's prediction-difference term for block reconstruction (Liu et al., CVPR 2023).

Besides the unit's output MSE, the loss compares the FP network's predictions
on a calibration batch with the predictions obtained by feeding the unit's
quantized output through the rest of the network, later units FP (their
quantizers off) and earlier units quantized as they were left. The caller
supplies ``PredictionSource.predict_fn(model, batch, context)``: the whole
forward from the batch to the head outputs, as rows of class scores and
(optionally) box regressions. The unit's output inside that forward is
replaced by the given tensor, so gradients reach the unit's rounding and step
parameters through the tail.

The authors' term (classification) is KL(softmax(z_fp/T) ‖ softmax(z_q/T))
averaged over images, times 1/λ_r. Here it is, per group of rows: the KL over
classes averaged over rows (softmax groups), or the sum over classes of the
binary KL of sigmoid(z/T) (sigmoid groups, e.g. RPN / RetinaNet scores), plus
the squared error of box regressions averaged over rows weighted by the FP
foreground probability (boxes of background anchors carry no prediction).

FP predictions do not depend on the unit, so they are computed once per run
and kept per calibration batch (in the unit cache's dtype, host memory up to
``pd_cache_gb``, then spilled with the unit cache); ``context`` tensors the
FP forward returns (e.g. FP proposals for an RoI head) are kept in float32
and handed back to the tail so its rows line up with the FP rows.
"""
from __future__ import annotations

import copy
import time
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distribution_correction import InputCorrection, bn_mismatch, input_correction
from .method_hooks import MethodHooks
from .methods import PredictionConfig, StageConfig
from .quant_state import quant_state
from .reconstruct import ProgressFn, ReconResult, reconstruct_unit
from .unit_cache import GiB, CacheBudgetError, CachePolicy, TensorStore, UnitCache, _Tiers

SCORE_KINDS = ('softmax', 'sigmoid')
EVAL_BATCHES = 32


@dataclass
class PredictionGroup:
    """Predictions on aligned rows: ``scores`` (rows, classes) logits, ``boxes`` (rows, k) regressions or None.

    ``kind`` is how the scores become probabilities; ``background`` is the background class of a
    softmax group (box rows are weighted by 1 − p_background; sigmoid groups by the top class probability).
    """

    scores: Tensor
    kind: str
    boxes: Optional[Tensor] = None
    background: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in SCORE_KINDS:
            raise ValueError(f'PredictionGroup.kind must be one of {SCORE_KINDS}, got {self.kind!r}')


PredictFn = Callable[[nn.Module, Any, Optional[List[Tensor]]], Tuple[List[PredictionGroup], List[Tensor]]]


def _none(*_args: Any) -> None:
    """The default ``fp_unit`` (no FP module: no correction) and ``check`` (every scope is served)."""


@dataclass
class PredictionSource:
    """What the caller supplies for PD-Quant.

    ``predict_fn(model, batch, context)`` returns (groups, context): on the FP pass ``context`` is None
    and the returned context is stored; on the tail passes the stored FP context is given back.
    ``fp_unit(name)`` returns the unit's FP module with its BatchNorms (not folded) for distribution
    correction, or None (no correction for that unit). ``check(model, scope_paths)`` raises ``ValueError``
    when ``predict_fn`` cannot serve ``model`` with those modules in scope (before any data is read).
    """

    predict_fn: PredictFn
    fp_unit: Callable[[str], Optional[nn.Module]] = _none
    check: Callable[[nn.Module, Sequence[str]], None] = _none


def score_difference(q: Tensor, fp: Tensor, kind: str, temperature: float) -> Tensor:
    """KL(p_fp ‖ p_q) at temperature T, summed over classes, averaged over rows."""
    q, fp = q / temperature, fp / temperature
    if kind == 'softmax':
        return F.kl_div(F.log_softmax(q, 1), F.log_softmax(fp, 1), reduction='sum', log_target=True) / q.shape[0]
    p = torch.sigmoid(fp)
    kl = F.binary_cross_entropy_with_logits(q, p, reduction='none') - \
        F.binary_cross_entropy_with_logits(fp, p, reduction='none')
    return kl.sum() / q.shape[0]


def foreground_weight(group: PredictionGroup) -> Tensor:
    """Per-row FP foreground probability (T = 1), no gradient."""
    scores = group.scores.detach()
    if group.kind == 'sigmoid':
        return torch.sigmoid(scores).amax(1)
    probs = scores.softmax(1)
    return 1 - probs[:, group.background] if group.background is not None else probs.amax(1)


def box_difference(q: Tensor, fp: Tensor, weight: Tensor) -> Tensor:
    """Σ_rows w·||q − fp||² / Σ_rows w."""
    return (weight * (q - fp).pow(2).sum(1)).sum() / weight.sum().clamp_min(1e-12)


def prediction_difference(q: Sequence[PredictionGroup], fp: Sequence[PredictionGroup], temperature: float) -> Tensor:
    """Sum over groups of the score KL and the foreground-weighted box error."""
    if len(q) != len(fp):
        raise ValueError(f'{len(q)} predicted groups against {len(fp)} FP groups')
    total = q[0].scores.new_zeros(())
    for gq, gf in zip(q, fp):
        if gq.scores.shape != gf.scores.shape:
            raise ValueError(f'prediction rows differ from the FP ones: {tuple(gq.scores.shape)} vs '
                             f'{tuple(gf.scores.shape)}')
        if gf.scores.shape[0] == 0:  # e.g. an image without proposals
            continue
        total = total + score_difference(gq.scores, gf.scores, gf.kind, temperature)
        if gf.boxes is not None:
            total = total + box_difference(gq.boxes, gf.boxes, foreground_weight(gf))
    return total


@contextmanager
def replaced_output(unit: nn.Module, output: Tensor) -> Iterator[None]:
    """The first call of ``unit`` inside the block returns ``output``; later calls compute as usual."""
    own = unit.__dict__.get('forward')
    original = unit.forward
    calls = 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return output if calls == 1 else original(*args, **kwargs)

    unit.forward = forward
    try:
        yield
    finally:
        if own is None:
            del unit.forward
        else:
            unit.forward = own
    if calls == 0:
        raise RuntimeError(f'{type(unit).__name__} was not called by predict_fn; '
                           'is the unit on the path to the predictions?')


class FPPredictions:
    """The FP network's predictions (and predict_fn's context) per calibration batch, computed once."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], predict_fn: PredictFn,
                 policy: Optional[CachePolicy], budget_bytes: int, device: torch.device) -> None:
        policy = policy or CachePolicy()
        self.device = device
        self._tiers = [_Tiers(CachePolicy(dtype, 0, budget_bytes, policy.spill_dir), device)
                       for dtype in (policy.dtype, 'float32')]
        self._scores = TensorStore('pd-fp', self._tiers[0])
        self._context = TensorStore('pd-context', self._tiers[1])
        self._layout: List[Tuple[List[Tuple[str, Optional[int], bool]], int, int, int]] = []
        weakref.finalize(self, _cleanup, self._tiers)
        with torch.no_grad(), quant_state(model, weight=False, act=False):
            for batch in batches:
                groups, context = predict_fn(model, batch, None)
                start, cstart = len(self._scores), len(self._context)
                try:
                    for g in groups:
                        self._scores.append(g.scores)
                        if g.boxes is not None:
                            self._scores.append(g.boxes)
                    for t in context:
                        self._context.append(t)
                except CacheBudgetError:
                    raise CacheBudgetError(f'the FP predictions of the calibration set need more than pd_cache_gb='
                                           f'{budget_bytes / GiB:.2f} GiB of host memory and spilling is off; '
                                           f'raise pd_cache_gb or enable spilling') from None
                meta = [(g.kind, g.background, g.boxes is not None) for g in groups]
                self._layout.append((meta, start, cstart, len(context)))

    def get(self, i: int) -> Tuple[List[PredictionGroup], List[Tensor]]:
        meta, start, cstart, n_ctx = self._layout[i]
        groups, k = [], start
        for kind, background, has_boxes in meta:
            scores = self._scores.get(k, self.device)
            boxes = self._scores.get(k + 1, self.device) if has_boxes else None
            k += 2 if has_boxes else 1
            groups.append(PredictionGroup(scores, kind, boxes, background))
        return groups, [self._context.get(cstart + j, self.device) for j in range(n_ctx)]

    def close(self) -> None:
        _cleanup(self._tiers)


def _cleanup(tiers: List[_Tiers]) -> None:
    for t in tiers:
        t.cleanup()


class PredictionTerm:
    """PD-Quant for one run: FP predictions, the tail through the model, distribution correction.

    ``units`` are the run's unit modules in network order; batch i of ``batches`` is cache entry i
    of every unit cache (one entry per calibration batch, as ``build_unit_cache`` captures them).
    """

    def __init__(self, model: nn.Module, units: Sequence[Tuple[str, nn.Module]], batches: Sequence[Any],
                 source: PredictionSource, cfg: PredictionConfig, policy: Optional[CachePolicy] = None) -> None:
        self.model, self.batches, self.source, self.cfg = model, batches, source, cfg
        self.modules = [m for _, m in units]
        self.device = next(iter(model.buffers())).device
        self.fp = FPPredictions(model, batches, source.predict_fn, policy, int(cfg.pd_cache_gb * GiB), self.device)
        self._dc_stats: dict = {}

    def close(self) -> None:
        self.fp.close()

    def predictions(self, unit: nn.Module, i: int, unit_output: Tensor) -> List[PredictionGroup]:
        """Predictions on batch i with ``unit``'s output replaced by ``unit_output`` and every later unit FP."""
        _, context = self.fp.get(i)
        later = next((self.modules[k + 1:] for k, m in enumerate(self.modules) if m is unit), None)
        if later is None:
            raise ValueError(f'{type(unit).__name__} is not one of the run\'s units')
        with ExitStack() as stack:
            for m in later:
                stack.enter_context(quant_state(m, weight=False, act=False))
            stack.enter_context(replaced_output(unit, unit_output))
            groups, _ = self.source.predict_fn(self.model, self.batches[i], context)
        return groups

    def difference(self, unit: nn.Module, i: int, unit_output: Tensor) -> Tensor:
        """The (unweighted) prediction difference on batch i for ``unit_output``."""
        return prediction_difference(self.predictions(unit, i, unit_output), self.fp.get(i)[0],
                                     self.cfg.pd_temperature)

    def _tail_difference(self, unit: nn.Module, i: int, unit_output: Tensor, stage: StageConfig) -> Tensor:
        with quant_state(self.model, weight=True, act=stage.act_quant, drop_prob=1.0):
            return self.difference(unit, i, unit_output)

    def _cached_difference(self, unit: nn.Module, cache: UnitCache, i: int, stage: StageConfig) -> Tensor:
        """The tail difference for ``unit``'s output on its cached quantized input of batch i."""
        return self._tail_difference(unit, i, cache.call_args[i](unit, cache.x_q.get(i, self.device)), stage)

    def training_loss(self, unit: nn.Module, cache: UnitCache, stage: StageConfig
                      ) -> Callable[[int], Optional[Tensor]]:
        """The extra loss for ``reconstruct_unit``: pd_weight × the difference on a random cached batch."""
        def term(it: int) -> Optional[Tensor]:
            if it % self.cfg.pd_interval:
                return None
            i = int(torch.randint(0, len(cache), ()).item())
            return self.cfg.pd_weight * self._cached_difference(unit, cache, i, stage)
        return term

    @torch.no_grad()
    def evaluate(self, unit: nn.Module, cache: UnitCache, stage: StageConfig) -> float:
        """Mean difference over the first cached batches (at most EVAL_BATCHES), unit fully quantized, no drop."""
        n = min(len(cache), EVAL_BATCHES)
        with quant_state(unit, weight=True, act=stage.act_quant, drop_prob=1.0):
            return sum(self._cached_difference(unit, cache, i, stage).item() for i in range(n)) / n

    def input_correction(self, name: str) -> Optional[InputCorrection]:
        """DC for the named unit's cached FP inputs (None: off, or no BatchNorm in its FP module)."""
        self._dc_stats = {}
        fp_unit = self.source.fp_unit(name) if self.cfg.dc_iters > 0 else None
        correct = input_correction(fp_unit, self.cfg.dc_iters, self.cfg.dc_lr, self.cfg.dc_weight)
        if correct is None:
            return None
        stats = self._dc_stats = {'dc_mismatch_before': 0.0, 'dc_mismatch_after': 0.0, 'dc_seconds': 0.0,
                                  'dc_batches': 0}

        def tracked(x: Tensor) -> Tensor:
            start = time.perf_counter()
            y = correct(x)
            stats['dc_seconds'] += time.perf_counter() - start
            with torch.no_grad():
                stats['dc_mismatch_before'] += bn_mismatch(fp_unit, x).item()
                stats['dc_mismatch_after'] += bn_mismatch(fp_unit, y).item()
            stats['dc_batches'] += 1
            return y
        return tracked

    def reconstruct(self, unit: nn.Module, cache: UnitCache, stage: StageConfig,
                    progress: Optional[ProgressFn] = None) -> ReconResult:
        """``reconstruct_unit`` with the prediction term; ``extra`` holds the PD loss before/after and DC stats."""
        before = self.evaluate(unit, cache, stage)
        rec = reconstruct_unit(unit, cache, stage, progress=progress,
                               extra_loss=self.training_loss(unit, cache, stage))
        rec.extra.update(pd_loss_before=before, pd_loss_after=self.evaluate(unit, cache, stage))
        stats = self._dc_stats
        n = stats.get('dc_batches')
        if n:
            rec.extra.update(dc_mismatch_before=stats['dc_mismatch_before'] / n,
                             dc_mismatch_after=stats['dc_mismatch_after'] / n, dc_seconds=stats['dc_seconds'])
        return rec


class PredictionHooks(MethodHooks):
    """PD-Quant as hooks: an FP copy of the model before conversion (its BatchNorms for distribution
    correction), the FP predictions once after calibration, distribution correction of each unit's cached
    FP inputs, and the prediction-difference term in each unit's reconstruction."""

    def __init__(self, cfg: PredictionConfig, source: Optional[PredictionSource]) -> None:
        self.cfg, self.source = cfg, source
        self.term: Optional[PredictionTerm] = None

    def check(self, model: nn.Module, scope_paths: Sequence[str]) -> None:
        if self.source is not None:
            self.source.check(model, scope_paths)

    def prepare(self, model: nn.Module) -> None:
        if self.cfg.dc_iters > 0 and self.source is not None:
            fp_modules = dict(copy.deepcopy(model).named_modules(remove_duplicate=False))
            self.source = replace(self.source, fp_unit=fp_modules.get)

    def start(self, model: nn.Module, units: Sequence[Any], batches: Sequence[Any], forward_fn: Any,
              cache_policy: Optional[CachePolicy]) -> None:
        if self.source is None:
            raise ValueError('the method has a prediction term: pass run_ptq(prediction=PredictionSource(predict_fn, '
                             'fp_unit)) saying how to get the network predictions')
        shared = [u.name for u in units if u.calls != 1]
        if shared:
            raise ValueError(f'the prediction term needs one cache entry per batch; {shared} run several times per '
                             f'forward (shared head convs)')
        self.term = PredictionTerm(model, [(u.name, u.module) for u in units], batches, self.source, self.cfg,
                                   cache_policy)

    def input_correction(self, unit: Any) -> Optional[InputCorrection]:
        return self.term.input_correction(unit.name)

    def reconstruct(self, unit: Any, cache: UnitCache, stage: StageConfig,
                    progress: Optional[ProgressFn]) -> ReconResult:
        return self.term.reconstruct(unit.module, cache, stage, progress)

    def report(self, result: Any) -> Dict[str, Any]:
        """``prediction_loss``: per reconstructed unit, the prediction difference before/after and DC statistics."""
        rows = [{'name': r.name, 'stage': r.stage, **r.result.extra} for r in result.records if r.result.extra]
        return {'prediction_loss': rows} if rows else {}

    def close(self) -> None:
        if self.term is not None:
            self.term.close()
