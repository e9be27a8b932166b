"""PD-Quant's distribution correction (DC) of a unit's cached FP inputs.

With a small calibration set the cached inputs of a unit need not have the
statistics the network was trained on. DC moves an FP input x (one cached
batch) by Adam so that, at every BatchNorm inside the unit's FP module (BN
not folded), each image's per-channel mean and standard deviation of the BN
input match the BN's running statistics, while a penalty keeps x close to the
original:

    loss = Σ_bn [ ||μ_bn − μ_img||² + ||σ_bn − σ_img||² ] / N  +  w · Σ_c (x − x₀)² averaged over the rest

(σ = sqrt(var + 1e-6)), with ReduceLROnPlateau (patience 100, min lr 1e-5) on
the total, as the authors' ``GetDcFpLayerInpOut`` does. A unit whose FP module
has no BatchNorm (an FPN conv, a layer whose BN is a sibling) is left as is.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

STD_EPS = 1e-6
PLATEAU_PATIENCE = 100
MIN_LR = 1e-5

InputCorrection = Callable[[Tensor], Tensor]


def batchnorms(module: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """BatchNorms with running statistics inside ``module``, in registration order."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


def per_image_stats(t: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, sqrt(var + eps)) per image and channel over the remaining dims: two (N, C) tensors."""
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    return flat.mean(2), torch.sqrt(flat.var(2) + STD_EPS)


def bn_mismatch(fp_unit: nn.Module, x: Tensor) -> Tensor:
    """DC's statistics term for input ``x``: squared distance of per-image BN-input stats to running stats."""
    bns = batchnorms(fp_unit)
    seen: List[Tensor] = []
    handles = [bn.register_forward_hook(lambda _m, args, _out: seen.append(args[0])) for bn in bns]
    try:
        fp_unit(x)
    finally:
        for h in handles:
            h.remove()
    total = x.new_zeros(())
    for bn, inp in zip(bns, seen):
        mean, std = per_image_stats(inp)
        total = total + (mean - bn.running_mean).pow(2).sum() / inp.shape[0]
        total = total + (std - torch.sqrt(bn.running_var + STD_EPS)).pow(2).sum() / inp.shape[0]
    return total


def correct_input(fp_unit: nn.Module, x: Tensor, iters: int, lr: float, weight: float) -> Tensor:
    """The corrected copy of ``x`` (detached); ``fp_unit`` is the FP module with its BatchNorms (run in eval mode)."""
    params = list(fp_unit.parameters())
    flags, training = [p.requires_grad for p in params], fp_unit.training
    fp_unit.eval()
    x0 = x.detach()
    corrected = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([corrected], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=PLATEAU_PATIENCE, min_lr=MIN_LR)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            for _ in range(iters):
                opt.zero_grad(set_to_none=True)
                loss = bn_mismatch(fp_unit, corrected) + weight * (corrected - x0).pow(2).sum(1).mean()
                loss.backward()
                opt.step()
                sched.step(loss.item())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        fp_unit.train(training)
    return corrected.detach()


def input_correction(fp_unit: Optional[nn.Module], iters: int, lr: float, weight: float
                     ) -> Optional[InputCorrection]:
    """``x -> corrected x`` for one unit, or None when DC is off or the FP module has no BatchNorm."""
    if fp_unit is None or iters <= 0 or not batchnorms(fp_unit):
        return None
    return lambda x: correct_input(fp_unit, x, iters, lr, weight)
