"""Fold an eval-mode BatchNorm into the weight and bias of the layer before it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


@torch.no_grad()
def fold_bn(weight: Tensor, bias: Optional[Tensor], bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """Return (w', b') with layer(x; w', b') == bn(layer(x; w, b)) using running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f'{type(bn).__name__} has no running statistics (track_running_stats=False); '
                         'it cannot be folded for post-training quantization')
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    shape = (-1,) + (1,) * (weight.dim() - 1)
    w = (weight.double() * factor.reshape(shape)).to(weight.dtype)
    b0 = bias.double() if bias is not None else torch.zeros_like(inv_std)
    b = ((b0 - bn.running_mean.double()) * factor + beta).to(weight.dtype)
    return w, b
