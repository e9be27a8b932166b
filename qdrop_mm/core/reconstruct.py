"""Block reconstruction: learn a unit's rounding and activation steps on cached data.

Loss = output MSE (squared error summed over channels, averaged over batch
and space) + the AdaRound rounding regulariser. Adam on V (rounding) and Adam
with cosine annealing on activation step sizes, both every iteration. The
unit input is mixed element-wise from x_q and x_fp with the stage's drop
probability, and the unit's activation quantizers drop with the same p.
When done, rounding is hardened and dropping switched off.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .adaround import RoundingRegularizer
from .methods import StageConfig
from .quant_state import act_quantizers, quant_state, weight_quantizers
from .unit_cache import UnitCache

ProgressFn = Callable[[int, int, float], None]


def output_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dim 1), averaged over all else."""
    return (pred - target).pow(2).sum(1).mean()


@dataclass
class ReconResult:
    loss_before: float
    loss_after: float
    iters: int
    seconds: float
    curve: List[List[float]] = field(default_factory=list)


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
def evaluate_unit(unit: nn.Module, cache: UnitCache, device: torch.device, act_quant: bool) -> float:
    """Mean output MSE over every cached batch, the unit fully quantized (no drop)."""
    total = 0.0
    with quant_state(unit, weight=True, act=act_quant, drop_prob=1.0):
        for i in range(len(cache)):
            _, x_q, target = cache.entry(i, device)
            total += output_mse(unit(x_q), target).item()
    return total / len(cache)


def reconstruct_unit(unit: nn.Module, cache: UnitCache, stage: StageConfig,
                     device: Optional[torch.device] = None,
                     progress: Optional[ProgressFn] = None) -> ReconResult:
    """Run one stage of reconstruction on ``unit`` and harden its rounding."""
    device = device or next(unit.buffers()).device
    wqs, aqs = weight_quantizers(unit), act_quantizers(unit)
    loss_before = _mean_across_ranks(evaluate_unit(unit, cache, device, stage.act_quant))
    start = time.perf_counter()

    w_params = []
    if stage.learn_rounding:
        for q, layer_weight in _quantizers_with_weights(unit):
            q.init_rounding(layer_weight)
            q.set_mode('soft')
            w_params.append(q.alpha)
    a_params = []
    if stage.learn_act_steps:
        for q in aqs:
            q.scale.requires_grad_(True)
            a_params.append(q.scale)
    w_opt = torch.optim.Adam(w_params, lr=stage.w_lr) if w_params else None
    a_opt = torch.optim.Adam(a_params, lr=stage.a_lr) if a_params else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=stage.iters, eta_min=0.0) if a_opt else None
    reg = RoundingRegularizer(stage.iters, stage.round_weight, stage.warmup, stage.b_start, stage.b_end)

    curve: List[List[float]] = []
    keep = stage.drop_prob if stage.act_quant else 1.0
    try:
        with quant_state(unit, weight=True, act=stage.act_quant, drop_prob=keep), torch.enable_grad():
            for it in range(stage.iters):
                x_fp, x_q, target = cache.sample(stage.batch_size, device)
                x = mix_inputs(x_fp, x_q, keep)
                rec = output_mse(unit(x), target)
                loss = rec
                round_term = reg(it, wqs) if w_opt is not None else None
                if round_term is not None:
                    loss = loss + round_term
                if w_opt:
                    w_opt.zero_grad(set_to_none=True)
                if a_opt:
                    a_opt.zero_grad(set_to_none=True)
                loss.backward()
                _average_gradients(w_params + a_params)
                if w_opt:
                    w_opt.step()
                if a_opt:
                    a_opt.step()
                    a_sched.step()
                    for q in aqs:
                        q.clamp_step()
                if (it + 1) % stage.log_interval == 0 or it == 0 or it + 1 == stage.iters:
                    value = rec.item()
                    if not torch.isfinite(loss).item():
                        raise NonFiniteLossError(it, float(loss.item()))
                    curve.append([it + 1, value])
                    if progress is not None:
                        progress(it + 1, stage.iters, value)
    finally:
        for q in aqs:
            q.scale.requires_grad_(False)
    if stage.learn_rounding:
        for q in wqs:
            q.set_mode('hard')
    seconds = time.perf_counter() - start
    loss_after = _mean_across_ranks(evaluate_unit(unit, cache, device, stage.act_quant))
    return ReconResult(loss_before, loss_after, stage.iters, seconds, curve)


def _mean_across_ranks(value: float) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def _average_gradients(params: List[Tensor]) -> None:
    """Under torch.distributed, average the learned parameters' gradients so every rank steps alike."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _quantizers_with_weights(unit: nn.Module):
    """(weight quantizer, the FP weight it quantizes) for each quantized layer in unit."""
    for m in unit.modules():
        q = getattr(m, 'weight_quantizer', None)
        if q is not None:
            yield q, m.weight
