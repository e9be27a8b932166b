"""Observers that choose a quantization range from data.

``MinMaxObserver`` keeps the running extremes. ``MSEObserver`` searches, for
each batch it sees, the range minimising the L_p error (p = 2.4 as in the
QDrop reference code) and averages the chosen ranges over batches, so memory
stays bounded however much calibration data flows through it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .fake_quant import EPS, qparams_from_range, quant_max


def _per_channel_2d(x: Tensor, ch_axis: Optional[int]) -> Tensor:
    """View x as [C, N] (C = 1 for per-tensor)."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)


def lp_error(x2d: Tensor, x_min: Tensor, x_max: Tensor, qmax: int, p: float) -> Tensor:
    """Mean |x − Q(x)|^p per row of x2d for the grid spanning [x_min, x_max] per row."""
    scale = ((x_max - x_min) / qmax).clamp(min=EPS).unsqueeze(1)
    zp = torch.round(-x_min.unsqueeze(1) / scale)
    xq = (torch.clamp(torch.round(x2d / scale) + zp, 0, qmax) - zp) * scale
    return (xq - x2d).abs().pow(p).mean(dim=1)


class MinMaxObserver:
    """Running min/max per tensor or per channel."""

    def __init__(self, bits: int, ch_axis: Optional[int] = None) -> None:
        self.qmax = quant_max(bits)
        self.ch_axis = ch_axis
        self.min_val: Optional[Tensor] = None
        self.max_val: Optional[Tensor] = None

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        x2d = _per_channel_2d(x.detach().float(), self.ch_axis)
        lo, hi = x2d.min(dim=1).values, x2d.max(dim=1).values
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def compute(self) -> Tuple[Tensor, Tensor]:
        """Return (scale, zero_point) for what was observed."""
        if self.min_val is None:
            raise RuntimeError('observer has seen no data: run calibration before computing qparams')
        return qparams_from_range(self.min_val, self.max_val, self.qmax)


class MSEObserver(MinMaxObserver):
    """L_p-optimal range search, averaged over observed batches.

    Candidates are the reference code's: range fractions i/num (i = 1 … num)
    of the observed range and, for two-sided data, zero points. Non-negative
    data (e.g. after ReLU) keeps zero point 0. Two-sided data tries the zero
    points within ``zp_window`` levels of the one that keeps the observed
    min/max proportions. The fractions are searched coarse-to-fine (every
    ``coarse_step``-th, then every one around the best per channel), which
    finds the same optimum for the unimodal error curves of weights and
    activations at a third of the cost: that is what makes it usable on CPU.
    """

    def __init__(self, bits: int, ch_axis: Optional[int] = None, p: float = 2.4,
                 num: int = 100, zp_window: int = 2, coarse_step: int = 5) -> None:
        super().__init__(bits, ch_axis)
        self.p = p
        self.num = num
        self.zp_window = zp_window
        self.coarse_step = coarse_step
        self._sum_min: Optional[Tensor] = None
        self._sum_max: Optional[Tensor] = None
        self._count = 0

    @torch.no_grad()
    def search(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Best (min, max) per channel for one tensor."""
        x2d = _per_channel_2d(x.detach().float(), self.ch_axis)
        x_min = x2d.min(dim=1).values.clamp(max=0)
        x_max = x2d.max(dim=1).values.clamp(min=0)
        xrange = (x_max - x_min).clamp(min=EPS)
        one_sided = bool((x_min >= 0).all())
        offsets = [0] if one_sided else list(range(-self.zp_window, self.zp_window + 1))
        zp_centre = torch.zeros_like(x_min) if one_sided else torch.round(-x_min / xrange * self.qmax)
        best = [torch.full_like(x_min, float('inf')), x_min.clone(), x_max.clone(), torch.full_like(x_min, self.num)]

        def try_fraction(frac: Tensor) -> None:
            width = xrange * frac / self.num
            delta = width / self.qmax
            for off in offsets:
                zp = (zp_centre + off).clamp(0, self.qmax)
                new_min = -zp * delta
                score = lp_error(x2d, new_min, new_min + width, self.qmax, self.p)
                better = score < best[0]
                best[:] = [torch.where(better, new, old)
                           for new, old in zip((score, new_min, new_min + width, frac), best)]

        step = max(1, min(self.coarse_step, self.num))
        for i in range(step, self.num + 1, step):
            try_fraction(torch.full_like(x_min, float(i)))
        if step > 1:
            centre = best[3].clone()
            for off in range(-step + 1, step):
                if off != 0:
                    try_fraction((centre + off).clamp(1, self.num))
        return best[1], best[2]

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        lo, hi = self.search(x)
        self._sum_min = lo if self._sum_min is None else self._sum_min + lo
        self._sum_max = hi if self._sum_max is None else self._sum_max + hi
        self._count += 1
        self.min_val = self._sum_min / self._count
        self.max_val = self._sum_max / self._count


def build_observer(kind: str, bits: int, ch_axis: Optional[int] = None) -> MinMaxObserver:
    """Observer by name: 'minmax' or 'mse'."""
    if kind == 'minmax':
        return MinMaxObserver(bits, ch_axis)
    if kind == 'mse':
        return MSEObserver(bits, ch_axis)
    raise ValueError(f"observer must be 'minmax' or 'mse', got {kind!r}")
