"""QwT (Quantization without Tears, Fu et al., CVPR 2025): closed-form linear compensation.

Every quantized unit f_q gets a linear correction of its own input x_q:
y = f_q(x_q) + W x_q + b, with W, b the ridge least-squares fit of the residual
Y_fp - f_q(X_q) over the calibration set. No gradient steps. For conv units the
correction is a 1x1 ``nn.Conv2d`` with the unit's spatial stride, so it maps
C_in channels to C_out channels and downsamples like the unit.

Units are fitted in network order; unit k sees x_q from the model with every
earlier unit quantized and already compensated (all quantizers on), and its
targets are the FP model's outputs of that unit (x_fp through the FP unit), as
the reconstruction stages use.

Where the correction sits: by default (``'before_quantizer'``) it is added
*before* the unit's output activation quantizer, which moves from the unit into
the wrapper: y = Q(f(x_q) + W x_q + b). The next unit then still receives
values on the activation grid, so a deployed graph stays integer between units
(the correction is one more conv accumulating into the block output before
requantization); the reference ResNet code gets the same effect because its
quantizers sit on conv inputs. ``'after_quantizer'`` adds it after Q, which
also absorbs the output rounding but hands the next unit off-grid values.

Sufficient statistics (X^T X, Y^T X, Σy²) are accumulated in float64 over
batches and pixels, so memory does not grow with the calibration set, and are
summed across ranks under torch.distributed. They are kept for two folds (even
and odd batches), which gives a validated choice of the ridge and of whether to
compensate a unit at all: with few pixels per input channel (deep layers, few
or small calibration images) the plain fit overfits and makes held-out
features worse, so a unit whose fit does not validate stays uncompensated.
The fit is one solve of a (C_in+1)² system per candidate; no gradient steps.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .capture import CallArgs, ForwardFn, capture_inputs
from .distributed import all_reduce_sum_
from .lsq import LSQActQuantizer
from .method_hooks import MethodHooks
from .methods import COMPENSATION_PLACEMENTS
from .quant_state import quant_state, weight_quantizers
from .reconstruct import ReconResult

if TYPE_CHECKING:  # pragma: no cover
    from .methods import CompensationConfig
    from .ptq import PTQCallbacks, PTQResult, Unit

ROWS_PER_CHUNK = 1 << 16
RIDGE_STEPS = (1.0, 1e2, 1e4)
MAX_STRIDE = 64


class Compensated(nn.Module):
    """A quantized unit plus its QwT compensation ``compensation`` (a plain 1x1 ``nn.Conv2d``, FP32).

    forward: y = unit(x), plus compensation(x) once fitted and unless the unit's
    weight quantizers are all off (so the FP path of the model stays the FP network),
    then ``out_quantizer`` (the unit's output quantizer, moved here for the
    ``'before_quantizer'`` placement; None otherwise). ``compensation_stride``
    persists the conv's stride so a saved model rebuilds it on load.
    """

    def __init__(self, unit: nn.Module, out_quantizer: Optional[LSQActQuantizer] = None) -> None:
        super().__init__()
        self.unit = unit
        self.register_module('compensation', None)
        self.out_quantizer = out_quantizer
        device = next(unit.buffers(), next(unit.parameters(), torch.empty(0))).device
        self.register_buffer('compensation_stride', torch.ones(2, dtype=torch.long, device=device))
        self.register_load_state_dict_pre_hook(_build_compensation_from_state)

    @property
    def active(self) -> bool:
        """Fitted, and the unit's weights are quantized (a unit without weight quantizers, e.g. exported, counts)."""
        wqs = weight_quantizers(self.unit)
        return self.compensation is not None and (not wqs or any(q.enabled for q in wqs))

    @torch.no_grad()
    def install(self, weight: Tensor, bias: Tensor, stride: Tuple[int, int]) -> None:
        """Set the compensation to the 1x1 conv ``weight`` (C_out, C_in) with ``bias`` and ``stride``."""
        conv = _make_conv(weight.shape, stride, self.compensation_stride.device)
        conv.weight.copy_(weight.reshape(conv.weight.shape))
        conv.bias.copy_(bias)
        self.compensation = conv
        self.compensation_stride.copy_(torch.tensor(stride))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = self.unit(x, *args, **kwargs)
        if self.active:
            y = y + self.compensation(x)
        if self.out_quantizer is not None:
            y = self.out_quantizer(y)
        return y


def _make_conv(shape: Sequence[int], stride: Tuple[int, int], device: Any) -> nn.Conv2d:
    """The frozen 1x1 conv of a (C_out, C_in, ...) compensation weight."""
    conv = nn.Conv2d(shape[1], shape[0], 1, stride=tuple(int(s) for s in stride), bias=True, device=device)
    conv.requires_grad_(False)
    return conv


def _build_compensation_from_state(module: Compensated, state_dict: dict, prefix: str, *args: Any) -> None:
    """Create the conv a saved state holds (shape from its weight, stride from ``compensation_stride``)."""
    weight = state_dict.get(f'{prefix}compensation.weight')
    if weight is None:
        return
    stride = state_dict.get(f'{prefix}compensation_stride', module.compensation_stride).tolist()
    if module.compensation is None or module.compensation.weight.shape != weight.shape \
            or list(module.compensation.stride) != stride:
        module.compensation = _make_conv(weight.shape, stride, module.compensation_stride.device)


def _detach_output_quantizer(module: nn.Module) -> Optional[LSQActQuantizer]:
    """Remove and return the quantizer on ``module``'s output (last layer of a Sequential), if any."""
    if isinstance(module, nn.Sequential):
        return _detach_output_quantizer(module[-1]) if len(module) else None
    q = getattr(module, 'act_quantizer', None)
    if isinstance(q, LSQActQuantizer):
        module.act_quantizer = None
        return q
    return None


def wrap_unit(unit: nn.Module, placement: str = 'before_quantizer') -> Compensated:
    """``unit`` inside a :class:`Compensated` (not yet fitted); its output quantizer moves for 'before_quantizer'."""
    if placement not in COMPENSATION_PLACEMENTS:
        raise ValueError(f'compensation placement must be one of {COMPENSATION_PLACEMENTS}, got {placement!r}')
    if isinstance(unit, Compensated):
        return unit
    out_q = _detach_output_quantizer(unit) if placement == 'before_quantizer' else None
    return Compensated(unit, out_q)


def wrap_units(model: nn.Module, modules: Sequence[nn.Module], placement: str = 'before_quantizer'
               ) -> List[Compensated]:
    """Wrap each unit module in place inside ``model`` (already wrapped ones are kept); returns the wrappers."""
    wrappers = []
    for module in modules:
        wrapper = wrap_unit(module, placement)
        if wrapper is not module:
            _replace_child(model, module, wrapper)
        wrappers.append(wrapper)
    return wrappers


def _replace_child(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError(f'{type(old).__name__} is not a submodule of {type(model).__name__}')


class LeastSquaresAccumulator:
    """Ridge least squares y ≈ W x + b from streamed rows, via float64 sums of [x,1]^T[x,1] and y^T[x,1]."""

    def __init__(self, in_features: int, out_features: int, device: Any = None) -> None:
        d = in_features + 1
        self.xtx = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.ytx = torch.zeros(out_features, d, dtype=torch.float64, device=device)
        self.yty = torch.zeros((), dtype=torch.float64, device=device)
        self.rows = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: Tensor, y: Tensor) -> None:
        """Add rows ``x`` (N, in_features) with targets ``y`` (N, out_features)."""
        for xc, yc in zip(x.split(ROWS_PER_CHUNK), y.split(ROWS_PER_CHUNK)):
            xa = torch.cat([xc.double(), xc.new_ones(xc.shape[0], 1, dtype=torch.float64)], 1)
            yc = yc.double()
            self.xtx += xa.T @ xa
            self.ytx += yc.T @ xa
            self.yty += yc.pow(2).sum()
            self.rows += xc.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics over ranks (no-op outside torch.distributed)."""
        all_reduce_sum_([self.xtx, self.ytx, self.yty, self.rows])

    def solve(self, ridge: float = 0.0) -> Tuple[Tensor, Tensor]:
        """(W, b) minimising Σ||y - W x - b||² + λ||W||², λ = ridge · mean diagonal of X^T X (b unpenalised)."""
        a = self.xtx.clone()
        diag = a.diagonal()[:-1]
        lam = ridge * float(diag.mean()) if diag.numel() else 0.0
        diag += lam if lam > 0 else ridge
        sol, info = torch.linalg.solve_ex(a, self.ytx.T)
        if int(info) != 0 or not torch.isfinite(sol).all():
            sol = torch.linalg.pinv(a, hermitian=True) @ self.ytx.T
        return sol[:-1].T.contiguous(), sol[-1].contiguous()

    def sse(self, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> float:
        """Σ||y - W x - b||² over all rows added (Σ||y||² without W, b)."""
        if weight is None:
            return float(self.yty)
        wa = torch.cat([weight, bias[:, None]], 1).to(self.xtx)
        value = self.yty - 2 * (wa * self.ytx).sum() + ((wa @ self.xtx) * wa).sum()
        return max(float(value), 0.0)


def _unit_stride(x: Tensor, y: Tensor) -> Optional[Tuple[int, int]]:
    """Stride s with ceil(size_in / s) = size_out per spatial dim (a 1x1 conv then matches the unit), or None."""
    if x.dim() != 4 or y.dim() != 4 or x.shape[0] != y.shape[0]:
        return None
    stride = tuple(next((s for s in range(1, MAX_STRIDE + 1) if (n_in - 1) // s + 1 == n_out), None)
                   for n_in, n_out in zip(x.shape[2:], y.shape[2:]))
    return None if None in stride else stride


def _pixel_rows(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _capture(model: nn.Module, unit: nn.Module, batch: Any, forward_fn: ForwardFn, calls: int
             ) -> List[Tuple[Tensor, CallArgs]]:
    got: List[Tuple[Tensor, CallArgs]] = []
    capture_inputs(model, unit, [batch], forward_fn, sink=lambda x, call: got.append((x, call)), calls=calls)
    return got


def _cross_validated_sse(folds: Sequence[LeastSquaresAccumulator], ridge: float) -> float:
    """Σ over folds of the residual SSE on that fold of the fit on the other fold(s)."""
    return sum(test.sse(*_sum(f for j, f in enumerate(folds) if j != i).solve(ridge))
               for i, test in enumerate(folds))


def _sum(accs: Any) -> LeastSquaresAccumulator:
    accs = list(accs)
    out = copy.copy(accs[0])
    for name in ('xtx', 'ytx', 'yty', 'rows'):
        setattr(out, name, sum(getattr(a, name) for a in accs))
    return out


def choose_ridge(folds: Sequence[LeastSquaresAccumulator], ridge: float) -> Optional[float]:
    """The ridge among ``ridge`` × RIDGE_STEPS with the lowest 2-fold validated SSE, or None when
    no compensation (SSE = Σy²) validates better than every candidate."""
    scores = {r: _cross_validated_sse(folds, r) for r in sorted({ridge * s for s in RIDGE_STEPS})}
    best = min(scores, key=scores.get)
    return best if scores[best] < sum(f.sse() for f in folds) else None


@torch.no_grad()
def fit_compensation(model: nn.Module, wrapper: Compensated, batches: Sequence[Any], forward_fn: ForwardFn,
                     ridge: float = 1e-4, validate: bool = True, calls: int = 1) -> Optional[ReconResult]:
    """Fit and install ``wrapper``'s compensation from ``batches``; None when the unit is not a 4D conv unit.

    Streams one batch at a time: x_fp (FP model) and x_q (all quantizers on,
    earlier units compensated) are captured, the residual FP target minus the
    quantized unit's output before the compensation is accumulated. With
    ``validate`` (and two or more batches) even and odd batches form two folds:
    the ridge is chosen among ``ridge`` × RIDGE_STEPS by validated error, and the
    unit stays uncompensated when no fit beats none (few rows per input channel).
    The result's losses are the output MSE (summed over channels, mean over
    pixels) of the residual before and after, on the calibration data; ``iters`` is 0.
    ``calls``: how often the forward calls the unit per batch (every call's rows count).
    """
    start = time.perf_counter()
    folds: List[LeastSquaresAccumulator] = []
    target_sq = torch.zeros((), dtype=torch.float64)
    stride: Optional[Tuple[int, int]] = None
    for i, batch in enumerate(batches):
        with quant_state(model, weight=False, act=False):
            targets = [call(wrapper, x) for x, call in _capture(model, wrapper, batch, forward_fn, calls)]
        with quant_state(model, weight=True, act=True, drop_prob=1.0):
            got = _capture(model, wrapper, batch, forward_fn, calls)
            bases = [call(wrapper.unit, x) for x, call in got]
        for (x_q, _), base, target in zip(got, bases, targets):
            if not folds:
                stride = _unit_stride(x_q, base)
                if stride is None:
                    return None
                folds = [LeastSquaresAccumulator(x_q.shape[1], base.shape[1], device=x_q.device) for _ in range(2)]
                target_sq = target_sq.to(x_q.device)
            folds[i % 2].add(_pixel_rows(x_q[:, :, ::stride[0], ::stride[1]]), _pixel_rows(target - base))
            target_sq += target.double().pow(2).sum()
    if not folds:
        raise ValueError('fit_compensation needs at least one calibration batch')
    for f in folds:
        f.all_reduce()
    all_reduce_sum_([target_sq])
    acc = _sum(folds)
    if validate and float(folds[1].rows) > 0:
        ridge = choose_ridge(folds, ridge)
    rows, ref = float(acc.rows), max(float(target_sq), 1e-30)
    before = after = acc.sse()
    if ridge is not None:
        weight, bias = acc.solve(ridge)
        wrapper.install(weight.float(), bias.float(), stride)
        after = acc.sse(weight, bias)
    return ReconResult(before / rows, after / rows, 0, time.perf_counter() - start, [],
                       before / ref, after / ref)


class CompensationHooks(MethodHooks):
    """QwT as hooks: every unit wrapped in a :class:`Compensated` before calibration, fitted in unit order after
    the stages (a record per fitted unit, stage = number of stages; that pass always runs whole)."""

    def __init__(self, cfg: 'CompensationConfig') -> None:
        self.cfg = cfg

    def structure(self, model: nn.Module, units: List['Unit']) -> List['Unit']:
        wrappers = wrap_units(model, [u.module for u in units], self.cfg.placement)
        return [dataclasses.replace(u, module=w) for u, w in zip(units, wrappers)]

    def finalize(self, model: nn.Module, units: Sequence['Unit'], batches: Sequence[Any], forward_fn: ForwardFn,
                 callbacks: 'PTQCallbacks', result: 'PTQResult') -> None:
        from .ptq import UnitRecord
        stage = len(result.method['stages'])
        for unit in units:
            fit = fit_compensation(model, unit.module, batches, forward_fn, self.cfg.ridge, self.cfg.validate,
                                   unit.calls)
            if fit is None:
                callbacks.after_method_step(unit, None, f'[QwT] {unit.name}: left uncompensated: its input or '
                                            f'output is not an NCHW feature map a strided 1x1 conv can map (e.g. '
                                            f'transformer tokens)')
                continue
            result.records.append(UnitRecord(unit.name, unit.kind, stage, fit, 0))
            kept = '' if fit.loss_after < fit.loss_before else ', left uncompensated: no fit validated better than none'
            callbacks.after_method_step(unit, result.records[-1], f'[QwT] {unit.name}: residual MSE '
                                        f'{fit.loss_before:.5g} -> {fit.loss_after:.5g} (closed form, '
                                        f'{fit.seconds:.2f} s{kept})')
