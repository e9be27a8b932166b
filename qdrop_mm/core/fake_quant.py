"""Uniform affine fake quantization on an unsigned grid 0 … 2^b−1.

The integer grid is unsigned and asymmetric (a zero point shifts it), as in the
QDrop reference code. Rounding uses the straight-through estimator so the same
function serves RTN, LSQ (step sizes receive the LSQ gradient) and evaluation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

MIN_BITS = 2
MAX_BITS = 8
EPS = 1e-8


def check_bits(bits: int, name: str = 'bits') -> int:
    """Validate a bit width and return it; raises ValueError naming the key."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f'{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}')
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f'{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}')
    return bits


def quant_max(bits: int) -> int:
    """Largest integer level of the unsigned b-bit grid."""
    return 2 ** check_bits(bits) - 1


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with an identity gradient."""
    return (x.round() - x).detach() + x


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Return x unchanged in the forward pass, with its gradient multiplied by factor."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmax: int) -> Tensor:
    """Quantize-dequantize x: s·(clamp(round(x/s) + z, 0, qmax) − z)."""
    return (torch.clamp(round_ste(x / scale) + zero_point, 0, qmax) - zero_point) * scale


def qparams_from_range(x_min: Tensor, x_max: Tensor, qmax: int) -> Tuple[Tensor, Tensor]:
    """Scale and integer zero point for a range that is widened to include 0."""
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    scale = ((x_max - x_min) / qmax).clamp(min=EPS)
    zero_point = torch.clamp(torch.round(-x_min / scale), 0, qmax)
    return scale, zero_point


def channel_view_shape(x: Tensor, ch_axis: Optional[int]) -> Tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ch_axis of x."""
    if ch_axis is None:
        return (1,) * x.dim()
    shape = [1] * x.dim()
    shape[ch_axis] = x.shape[ch_axis]
    return tuple(shape)


class UniformQuantizer(nn.Module):
    """Fixed-parameter fake quantizer, per tensor (ch_axis=None) or per channel.

    Scale and zero point are buffers set by :meth:`set_qparams` (e.g. from an
    observer); gradients pass straight through the rounding to the input.
    """

    def __init__(self, bits: int, ch_axis: Optional[int] = None) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.ch_axis = ch_axis
        self.register_buffer('scale', torch.ones(1))
        self.register_buffer('zero_point', torch.zeros(1))
        self.enabled = True

    @property
    def qmax(self) -> int:
        return quant_max(self.bits)

    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Store scale and zero point (a scalar or one value per channel)."""
        self.scale = scale.detach().clone().reshape(-1).float()
        self.zero_point = zero_point.detach().clone().reshape(-1).float()

    def _broadcast(self, x: Tensor, t: Tensor) -> Tensor:
        return t.reshape(channel_view_shape(x, self.ch_axis)) if self.ch_axis is not None else t.reshape(())

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return fake_quantize(x, self._broadcast(x, self.scale), self._broadcast(x, self.zero_point), self.qmax)

    def extra_repr(self) -> str:
        return f'bits={self.bits}, ch_axis={self.ch_axis}'
