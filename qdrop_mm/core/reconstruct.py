"""Block reconstruction: learn a unit's rounding and activation steps on cached data.

Loss = output MSE (squared error summed over channels, averaged over batch
and space) + the AdaRound rounding regulariser. Adam on V (rounding) and Adam
with cosine annealing on activation step sizes, both every iteration, each
iteration averaging the gradients of ``accum_steps`` batches, at the learning
rates of the stage's schedule. The
unit input is mixed element-wise from x_q and x_fp with the stage's drop
probability, and the unit's activation quantizers drop with the same p.
When done, rounding is hardened and dropping switched off.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import fused
from .adaround import RoundingRegularizer
from .capture import CallArgs
from .distributed import all_reduce_mean_, world_size
from .lsq import clamp_steps
from .methods import StageConfig
from .quant_state import act_quantizers, quant_state, weight_quantizers
from .unit_cache import UnitCache

ProgressFn = Callable[[int, int, float], None]
ExtraLossFn = Callable[[int], Optional[Tensor]]


def output_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dim 1), averaged over all else."""
    return (pred - target).pow(2).sum(1).mean()


@dataclass
class ReconResult:
    """One unit's reconstruction: output MSE and relative error before/after, iterations run, curve."""

    loss_before: float
    loss_after: float
    iters: int
    seconds: float
    curve: List[List[float]] = field(default_factory=list)
    rel_error_before: Optional[float] = None
    rel_error_after: Optional[float] = None
    stopped_early: bool = False
    extra: Dict[str, float] = field(default_factory=dict)
    movement: Dict[str, float] = field(default_factory=dict)


class NonFiniteLossError(FloatingPointError):
    """Reconstruction produced a NaN/inf loss."""

    def __init__(self, iteration: int, value: float) -> None:
        super().__init__(f'non-finite reconstruction loss {value} at iteration {iteration}')
        self.iteration = iteration
        self.value = value


def mix_inputs(x_fp: Tensor, x_q: Tensor, keep_prob: float) -> Tensor:
    """where(U < p, x_q, x_fp) with a fresh uniform U per element."""
    if keep_prob >= 1.0:
        return x_q
    if keep_prob <= 0.0:
        return x_fp
    return torch.where(torch.rand_like(x_q) < keep_prob, x_q, x_fp)


@torch.no_grad()
def unit_errors(unit: nn.Module, cache: UnitCache, device: torch.device, act_quant: bool,
                entries: Optional[int] = None) -> Tuple[float, float]:
    """(mean output MSE, relative error ||y_q - y||² / ||y||²) over the cache (its first ``entries``), fully
    quantized, no drop."""
    n = len(cache) if entries is None else min(entries, len(cache))
    mse, err, ref = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
    with quant_state(unit, weight=True, act=act_quant, drop_prob=1.0):
        for i in range(n):
            _, x_q, target, call = cache.entry(i, device)
            diff = call(unit, x_q) - target
            mse += diff.pow(2).sum(1).mean()
            err += diff.pow(2).sum()
            ref += target.pow(2).sum()
    return mse.item() / n, err.item() / max(ref.item(), 1e-30)


def reconstruct_unit(unit: nn.Module, cache: UnitCache, stage: StageConfig, progress: Optional[ProgressFn] = None,
                     extra_loss: Optional[ExtraLossFn] = None) -> ReconResult:
    """Run one stage of reconstruction on ``unit`` and harden its rounding.

    ``extra_loss(iteration)``, when given, returns a term added to the loss (or None to skip it this
    iteration); it runs inside the unit's training quantizer state (e.g. PD-Quant's prediction term).
    """
    device = next(unit.buffers()).device
    wqs, aqs = weight_quantizers(unit), act_quantizers(unit)
    loss_before, rel_before = (_mean_across_ranks(v) for v in unit_errors(unit, cache, device, stage.act_quant))
    start = time.perf_counter()

    w_params = []
    if stage.learn_rounding:
        for q, layer_weight in _quantizers_with_weights(unit):
            q.init_rounding(layer_weight)
            q.set_mode('soft')
            w_params.append(q.alpha)
    a_params = [q.scale for q in aqs] if stage.learn_act_steps else []
    steps_before = [q.scale.detach().clone() for q in aqs]
    b_params = _layer_biases(unit) if stage.learn_bias else []
    if not (w_params or a_params or b_params):  # e.g. BRECQ's activation stage on a unit without act quantizers
        return ReconResult(loss_before, loss_before, 0, 0.0, [], rel_before, rel_before)
    for p in a_params + b_params:
        p.requires_grad_(True)
    w_opt = torch.optim.Adam(w_params, lr=stage.effective_w_lr, foreach=True) if w_params else None
    annealed = [{'params': params, 'lr': lr} for params, lr in
                ((a_params, stage.effective_a_lr), (b_params, stage.effective_b_lr)) if params]
    a_opt = torch.optim.Adam(annealed, foreach=True) if annealed else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=stage.iters, eta_min=0.0) if a_opt else None
    reg = RoundingRegularizer(stage.iters, stage.round_weight, stage.warmup, stage.b_start, stage.b_end)
    stopper = EarlyStopper(stage.early_stop_patience, stage.early_stop_rel_tol) if stage.early_stop_patience else None

    curve: List[List[float]] = []
    keep = stage.drop_prob if stage.act_quant else 1.0
    iters_run, stopped = stage.iters, False
    forward = torch.compile(unit) if stage.compile else unit
    if stage.compile:
        torch._dynamo.reset()  # graphs of earlier units are done with; each unit gets the full recompile budget

    k = stage.accum_steps
    fast = all(q.fused for q in wqs + aqs)  # the unit's quantizers say which implementation runs
    compile_kernels = all(q.compiled for q in wqs + aqs)

    def draw_batch() -> Tuple[Tensor, Tensor, CallArgs]:
        """One (mixed input, target, call arguments) training batch."""
        x_fp, x_q, target, call = cache.sample(stage.batch_size, device)
        x = fused.mix_inputs(x_fp, x_q, keep, compile_kernels) if fast else mix_inputs(x_fp, x_q, keep)
        return x, target, call

    def step_gradients(fwd: Callable[..., Tensor], batches: List[Tuple[Tensor, Tensor, CallArgs]], it: int):
        """Fresh gradients of one optimiser step; returns (last batch's MSE, the step's loss).

        Each batch backpropagates its share of the step's loss; the step-wide terms ride on the first batch.
        """
        for opt in filter(None, (w_opt, a_opt)):
            opt.zero_grad(set_to_none=True)
        total = None
        for micro, (x, target, call) in enumerate(batches):
            y = call(fwd, x)
            rec = fused.output_mse(y, target, compile_kernels) if fast else output_mse(y, target)
            loss = rec / k if k > 1 else rec
            if micro == 0:
                for term in (reg(it, wqs) if w_opt is not None else None,
                             extra_loss(it) if extra_loss is not None else None):
                    if term is not None:
                        loss = loss + term
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        return rec, total

    try:
        with quant_state(unit, weight=True, act=stage.act_quant, drop_prob=keep), torch.enable_grad():
            for it in range(stage.iters):
                batches = [draw_batch() for _ in range(k)]
                try:
                    rec, loss = step_gradients(forward, batches, it)
                except Exception as err:  # noqa: BLE001  a compiled graph failed: the eager unit is always right
                    if forward is unit:
                        raise
                    warnings.warn(f'torch.compile failed for {type(unit).__name__} at iteration {it + 1} '
                                  f'({type(err).__name__}: {str(err).splitlines()[0][:200]}); '
                                  f'reconstructing it eagerly from here')
                    forward = unit
                    rec, loss = step_gradients(forward, batches, it)
                _average_gradients(w_params + a_params + b_params)
                if w_opt:
                    w_opt.step()
                if a_opt:
                    a_opt.step()
                    a_sched.step()
                    clamp_steps(aqs)
                if (it + 1) % stage.log_interval == 0 or it == 0 or it + 1 == stage.iters:
                    value = rec.item()
                    if not torch.isfinite(loss).item():
                        raise NonFiniteLossError(it, float(loss.item()))
                    curve.append([it + 1, value])
                    if progress is not None:
                        progress(it + 1, stage.iters, value)
                    if stopper is not None and stage.early_stop_after * stage.iters <= it + 1 < stage.iters and \
                            stopper.update(_hardened_probe_mse(unit, cache, device, stage.act_quant)):
                        iters_run, stopped = it + 1, True
                        if progress is not None:
                            progress(stage.iters, stage.iters, value)
                        break
    finally:
        for p in [q.scale for q in aqs] + b_params:
            p.requires_grad_(False)
    if stage.learn_rounding:
        for q in wqs:
            q.set_mode('hard')
    seconds = time.perf_counter() - start
    loss_after, rel_after = (_mean_across_ranks(v) for v in unit_errors(unit, cache, device, stage.act_quant))
    movement = {}
    if stage.learn_rounding:
        movement['rounding_changed'] = rounding_changed_fraction(unit)
    if stage.learn_act_steps and aqs:
        movement['act_step_rel_change'] = sum(
            ((q.scale.detach() - s0).abs() / s0.abs().clamp_min(1e-12)).item() for q, s0 in zip(aqs, steps_before)
        ) / len(aqs)
    return ReconResult(loss_before, loss_after, iters_run, seconds, curve, rel_before, rel_after, stopped,
                       movement=movement)


@torch.no_grad()
def rounding_changed_fraction(unit: nn.Module) -> float:
    """Share of the unit's weights whose learned (hard) rounding differs from rounding to nearest."""
    changed = total = 0
    for q, w in _quantizers_with_weights(unit):
        if q.mode == 'nearest':
            continue
        scale, zp = q._qparams(w)
        nearest = torch.clamp(torch.round(w / scale) + zp, 0, q.qmax)
        changed += (q.integer_weight(w) != nearest).sum().item()
        total += w.numel()
    return changed / max(total, 1)


class EarlyStopper:
    """Flat-loss test: True once ``patience`` successive checks improved the best value by less than ``rel_tol``."""

    def __init__(self, patience: int, rel_tol: float) -> None:
        self.patience = patience
        self.rel_tol = rel_tol
        self.best = float('inf')
        self.flat_checks = 0

    def update(self, loss: float) -> bool:
        self.flat_checks = 0 if loss < self.best * (1 - self.rel_tol) else self.flat_checks + 1
        self.best = min(self.best, loss)
        return self.flat_checks >= self.patience


PROBE_ENTRIES = 4


@torch.no_grad()
def _hardened_probe_mse(unit: nn.Module, cache: UnitCache, device: torch.device, act_quant: bool) -> float:
    """Output MSE on the first cached batches with rounding hardened and no drop: what the unit would keep now.

    The soft rounding's training loss falls with the regulariser's schedule whatever happens, so the
    flat-loss test watches the loss the unit would have if it stopped here.
    """
    wqs = weight_quantizers(unit)
    modes = [q.mode for q in wqs]
    for q in wqs:
        if q.mode == 'soft':
            q.mode = 'hard'
    try:
        return _mean_across_ranks(unit_errors(unit, cache, device, act_quant, PROBE_ENTRIES)[0])
    finally:
        for q, m in zip(wqs, modes):
            q.mode = m


def _mean_across_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    all_reduce_mean_([t])
    return float(t.item())


def _average_gradients(params: List[Tensor]) -> None:
    """Under torch.distributed, average the learned parameters' gradients so every rank steps alike."""
    if world_size() == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean_([flat])
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).clone()


def _layer_biases(unit: nn.Module) -> List[Tensor]:
    """The FP bias of each quantized layer in unit (a buffer the optimiser updates in place)."""
    return [m.bias for m in unit.modules() if getattr(m, 'weight_quantizer', None) is not None
            and isinstance(getattr(m, 'bias', None), Tensor)]


def _quantizers_with_weights(unit: nn.Module):
    """(weight quantizer, the FP weight it quantizes) for each quantized layer in unit."""
    for m in unit.modules():
        q = getattr(m, 'weight_quantizer', None)
        if q is not None:
            yield q, m.weight
