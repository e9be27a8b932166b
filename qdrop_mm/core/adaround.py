"""AdaRound: learned up/down rounding of weights on a per-channel grid.

w_q = s·(clamp(floor(w/s) + h(V) + z, 0, 2^b−1) − z) with the rectified
sigmoid h(V) = clip(sigmoid(V)·(ζ−γ)+γ, 0, 1). V starts where h(V) equals the
fractional part of w/s. After reconstruction the rounding is hardened to
floor(w/s) + [V ≥ 0].
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from . import fused as fused_ops
from .fake_quant import channel_view_shape, check_bits, quant_max
from .fused import GAMMA, ZETA
from .observers import build_observer

ROUNDING_MODES = ('nearest', 'soft', 'hard')


def _sync_mode(module: 'AdaRoundQuantizer', incompatible_keys) -> None:
    module._mode = ROUNDING_MODES[int(module.mode_code)]


class AdaRoundQuantizer(nn.Module):
    """Per-output-channel weight quantizer with nearest, soft (learned) or hard rounding.

    The scale and zero point are fixed once, from ``observer`` on the weight
    itself. ``alpha`` (V) is created by :meth:`init_rounding`; it is a parameter
    so it is saved in ``state_dict`` and optimised by reconstruction.
    ``fused`` runs soft rounding and its regulariser as one-pass autograd
    functions (``compiled``: through ``torch.compile``); False gives the
    separate autograd ops they are tested against.

    The rounding mode lives in the ``mode_code`` buffer (saved, restored); ``mode`` reads a Python
    mirror of it that only the ``mode`` setter and loading write, so the forward never reads a
    device tensor.
    """

    def __init__(self, weight: Tensor, bits: int, ch_axis: int = 0, observer: str = 'mse') -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.ch_axis = ch_axis
        self.enabled = True
        self.fused = True
        self.compiled = True
        obs = build_observer(observer, bits, ch_axis)
        obs.observe(weight)
        scale, zero_point = obs.compute()
        self.register_buffer('scale', scale.reshape(-1))
        self.register_buffer('zero_point', zero_point.reshape(-1))
        self.alpha = nn.Parameter(torch.zeros_like(weight), requires_grad=False)
        self.register_buffer('rounding_initialised', torch.tensor(False))
        self.register_buffer('mode_code', torch.tensor(0, dtype=torch.uint8))
        self._mode = 'nearest'
        self.register_load_state_dict_post_hook(_sync_mode)

    @property
    def mode(self) -> str:
        """'nearest', 'soft' or 'hard' (as the ``mode_code`` buffer says)."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in ROUNDING_MODES:
            raise ValueError(f'rounding mode must be one of {ROUNDING_MODES}, got {mode!r}')
        self._mode = mode
        self.mode_code.fill_(ROUNDING_MODES.index(mode))

    @property
    def qmax(self) -> int:
        return quant_max(self.bits)

    def _qparams(self, w: Tensor):
        shape = channel_view_shape(w, self.ch_axis)
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    @torch.no_grad()
    def init_rounding(self, weight: Tensor) -> None:
        """Set V so that h(V) equals the fractional part of w/s."""
        scale, _ = self._qparams(weight)
        x = weight / scale
        rest = (x - torch.floor(x)).clamp(1e-6, 1 - 1e-6)
        self.alpha.data = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.rounding_initialised.fill_(True)

    def set_mode(self, mode: str) -> None:
        """Switch rounding (V learned only in 'soft'); soft and hard need :meth:`init_rounding` first."""
        if mode != 'nearest' and mode in ROUNDING_MODES and not bool(self.rounding_initialised):
            raise RuntimeError('call init_rounding(weight) before switching to soft or hard rounding')
        self.mode = mode
        self.alpha.requires_grad_(mode == 'soft')

    def h(self) -> Tensor:
        """Rectified sigmoid of V, in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def integer_weight(self, w: Tensor) -> Tensor:
        """Grid levels 0 … 2^b−1 of w under the current rounding mode."""
        scale, zp = self._qparams(w)
        x = w / scale
        if self.mode == 'nearest':
            x_int = torch.round(x)
        elif self.mode == 'soft':
            x_int = torch.floor(x) + self.h()
        else:
            x_int = torch.floor(x) + (self.alpha >= 0).to(w.dtype)
        return torch.clamp(x_int + zp, 0, self.qmax)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        scale, zp = self._qparams(w)
        if self.mode == 'soft' and self.fused and self.ch_axis == 0:
            return fused_ops.soft_round(w, self.alpha, scale, zp, self.qmax, self.compiled)
        return (self.integer_weight(w) - zp) * scale

    def round_loss(self, beta: float) -> Tensor:
        """Σ (1 − |2h(V) − 1|^β): zero only when every h(V) is exactly 0 or 1."""
        if self.fused:
            return fused_ops.round_loss(self.alpha, beta, self.compiled)
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def extra_repr(self) -> str:
        return f'bits={self.bits}, ch_axis={self.ch_axis}, mode={self.mode}'


class RoundingRegularizer:
    """λ·Σ(1 − |2h−1|^β) with a warm-up and β annealed linearly from b_start to b_end.

    The term is zero for the first ``warmup`` fraction of iterations; from
    there β falls linearly from ``b_start`` to ``b_end`` at the last iteration.
    """

    def __init__(self, total_iters: int, weight: float = 0.01, warmup: float = 0.2,
                 b_start: float = 20.0, b_end: float = 2.0) -> None:
        if total_iters <= 0:
            raise ValueError(f'total_iters must be > 0, got {total_iters}')
        self.total_iters = total_iters
        self.weight = weight
        self.start_decay = int(math.ceil(warmup * total_iters)) if warmup > 0 else 0
        self.b_start = b_start
        self.b_end = b_end

    def beta(self, it: int) -> float:
        if it < self.start_decay:
            return self.b_start
        span = max(self.total_iters - 1 - self.start_decay, 1)
        rel = min((it - self.start_decay) / span, 1.0)
        return self.b_end + (self.b_start - self.b_end) * (1 - rel)

    def __call__(self, it: int, quantizers: Iterable[AdaRoundQuantizer]) -> Optional[Tensor]:
        """The regulariser at iteration ``it`` (0-based), or None during warm-up."""
        if it < self.start_decay:
            return None
        beta = self.beta(it)
        return self.weight * sum(q.round_loss(beta) for q in quantizers)
