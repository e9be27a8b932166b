"""LSQ activation quantizer with QDrop's element-wise random drop.

Per-tensor, unsigned asymmetric grid. The step size is a parameter learned
with the LSQ gradient (scaled by 1/sqrt(numel·Q_max)); the zero point is fixed
at calibration. With ``drop_prob`` = p < 1, each element independently keeps
its quantized value with probability p and its FP value otherwise, with a
fresh mask every forward (p is the probability of *keeping* quantization, as
in the reference code).

Two implementations: the reference (separate autograd ops, a ``rand_like``
mask) and the fused one (``fused.lsq_drop``: one pass forward, one backward,
the mask hashed from the element index and a per-call seed).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from . import fused as fused_ops
from .distributed import all_reduce_mean_
from .fake_quant import EPS, check_bits, fake_quantize, grad_scale, quant_max
from .observers import build_observer


def _sync_calibrated_flag(module: 'LSQActQuantizer', incompatible_keys) -> None:
    module._calibrated = bool(module.calibrated)


class LSQActQuantizer(nn.Module):
    """Learned-step activation fake quantizer with optional QDrop drop.

    States: ``observing`` feeds the observer (calibration); ``enabled``
    switches quantization on; ``drop_prob`` < 1 turns the drop on. ``fused``
    selects the one-pass autograd function (False: separate autograd ops, the
    reference the fused path is tested against); ``compiled`` lets its
    kernels run through ``torch.compile`` (False: the same kernels eagerly).

    Whether the range is set lives in the ``calibrated`` buffer (saved, restored); ``is_calibrated``
    reads a Python mirror of it that only :meth:`set_range` and loading write, so the forward never
    reads a device tensor.
    """

    def __init__(self, bits: int, observer: str = 'mse') -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer('zero_point', torch.zeros(()))
        self.register_buffer('calibrated', torch.tensor(False))
        self._calibrated = False
        self.register_load_state_dict_post_hook(_sync_calibrated_flag)
        self.observer_kind = observer
        self.observer = None
        self.enabled = True
        self.observing = False
        self.drop_prob = 1.0
        self.fused = True
        self.compiled = True

    @property
    def qmax(self) -> int:
        return quant_max(self.bits)

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    @torch.no_grad()
    def set_range(self, scale: Tensor, zero_point: Tensor) -> None:
        """Fix the step and zero point (calibration, or a test that wants a known grid)."""
        self.scale.data = torch.as_tensor(scale).reshape(()).float()
        self.zero_point = torch.as_tensor(zero_point).reshape(()).float()
        self.calibrated.fill_(True)
        self._calibrated = True

    def start_observing(self) -> None:
        self.observer = build_observer(self.observer_kind, self.bits)
        self.observing = True

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Fix scale and zero point from what the observer saw."""
        self.observing = False
        if self.observer is None or self.observer.min_val is None:
            raise RuntimeError('activation quantizer saw no data during calibration; '
                               'is it on the path of the calibration forward?')
        all_reduce_mean_([self.observer.min_val, self.observer.max_val])  # every rank adopts the ranks' mean range
        self.set_range(*self.observer.compute())
        self.observer = None

    @torch.no_grad()
    def clamp_step(self) -> None:
        """Keep the learned step positive after an optimiser update."""
        self.scale.data.abs_().clamp_(min=EPS)

    def quantize(self, x: Tensor) -> Tensor:
        scale = grad_scale(self.scale, self._grad_factor(x)) if self.scale.requires_grad else self.scale
        return fake_quantize(x, scale, self.zero_point, self.qmax)

    def quantizing(self) -> bool:
        return self.enabled and self.is_calibrated and self.drop_prob > 0.0

    def quantize_after(self, x: Tensor, activation: Optional[nn.Module]) -> Tensor:
        """self(activation(x)); on the fused path a ReLU or ReLU6 is folded into the kernel (one pass, not two)."""
        clip = fused_ops.activation_clip(activation)
        if clip is None or self.observing or not self.fused or not self.quantizing():
            return self(activation(x) if activation is not None else x)
        return fused_ops.lsq_drop(x, self.scale, self.zero_point, self.qmax, self.drop_prob, self._grad_factor(x),
                                  self.compiled, clip)

    def _grad_factor(self, x: Tensor) -> float:
        return 1.0 / math.sqrt(x.numel() * self.qmax) if self.scale.requires_grad else 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observer.observe(x)
        if not self.quantizing():
            return x
        if not self.fused:
            xq = self.quantize(x)
            return xq if self.drop_prob >= 1.0 else torch.where(torch.rand_like(x) < self.drop_prob, xq, x)
        return fused_ops.lsq_drop(x, self.scale, self.zero_point, self.qmax, self.drop_prob, self._grad_factor(x),
                                  self.compiled)

    def extra_repr(self) -> str:
        return f'bits={self.bits}, drop_prob={self.drop_prob}'


@torch.no_grad()
def clamp_steps(quantizers: Iterable[LSQActQuantizer]) -> None:
    """``clamp_step`` of every quantizer in two foreach calls."""
    scales = [q.scale.data for q in quantizers]
    if scales:
        torch._foreach_abs_(scales)
        torch._foreach_clamp_min_(scales, EPS)
