"""Quantized building blocks that replace FP modules inside a network.

``QuantLayer`` is one conv or linear with its BatchNorm folded in (or, for a norm
that cannot be folded such as GroupNorm or LayerNorm, that norm kept in FP after
the layer), an optional activation function and an optional output activation
quantizer. ``QuantOutput`` adds an output activation quantizer to any module.
``QuantResidual`` is a residual unit (ResNet blocks, MobileNetV2 inverted
residuals): a branch of QuantLayers plus a shortcut, an optional activation
after the add, and an optional quantizer on the unit output. Where the
activation quantizers sit is decided by whoever builds these (the block
rules), following the spec: on every inner conv(+act) output except the
branch's last conv and the shortcut, and on the unit output.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adaround import AdaRoundQuantizer
from .bn_fold import fold_bn
from .lsq import LSQActQuantizer

Layer = Union[nn.Conv2d, nn.Linear]


class QuantLayer(nn.Module):
    """Conv2d/Linear (+ folded BN) (+ FP norm) (+ activation) (+ output act quantizer).

    ``bn`` is folded into the weight; ``norm`` (a GroupNorm, LayerNorm, ...) is kept as an FP
    module between the layer and its activation. ``in_a_bits`` adds an activation quantizer on the
    layer's input (transformer linears whose input comes from an FP LayerNorm or attention).
    """

    def __init__(self, layer: Layer, w_bits: int, bn: Optional[nn.Module] = None,
                 activation: Optional[nn.Module] = None, a_bits: Optional[int] = None,
                 w_observer: str = 'mse', a_observer: str = 'mse', norm: Optional[nn.Module] = None,
                 in_a_bits: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f'QuantLayer wraps nn.Conv2d or nn.Linear, got {type(layer).__name__}')
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != 'zeros':
            raise ValueError(f"only padding_mode='zeros' is supported, got {layer.padding_mode!r}")
        self.kind = 'conv' if isinstance(layer, nn.Conv2d) else 'linear'
        if self.kind == 'conv':
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
        weight = layer.weight.detach().clone()
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        if bn is not None:
            weight, bias = fold_bn(weight, bias, bn)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.register_buffer('weight', weight)
        self.register_buffer('bias', bias)
        self.weight_quantizer = AdaRoundQuantizer(weight, w_bits, ch_axis=0, observer=w_observer)
        self.norm = norm
        if norm is not None:
            norm.requires_grad_(False)  # FP and fixed: reconstruction learns only quantizer parameters
        self.activation = activation
        self.act_quantizer = LSQActQuantizer(a_bits, a_observer) if a_bits is not None else None
        if in_a_bits is not None:
            self.input_quantizer = LSQActQuantizer(in_a_bits, a_observer)

    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return apply_layer(self, x, self.weight_quantizer(self.weight))


def apply_layer(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``layer``'s conv or linear with ``weight``, then its activation and output quantizer.

    Shared by :class:`QuantLayer` (fake-quantized weight) and its export form (dequantized integer weight).
    """
    if getattr(layer, 'input_quantizer', None) is not None:
        x = layer.input_quantizer(x)
    if layer.kind == 'conv':
        y = F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        y = F.linear(x, weight, layer.bias)
    if getattr(layer, 'norm', None) is not None:
        y = layer.norm(y)
    return _activate_and_quantize(y, layer.activation, layer.act_quantizer)


def _activate_and_quantize(y: Tensor, activation: Optional[nn.Module], quantizer: Optional[nn.Module]) -> Tensor:
    """``quantizer(activation(y))``, each optional; an LSQ quantizer folds a ReLU/ReLU6 into its kernel."""
    if isinstance(quantizer, LSQActQuantizer):
        return quantizer.quantize_after(y, activation)
    if activation is not None:
        y = activation(y)
    if quantizer is not None:  # e.g. the export's QDQ form
        y = quantizer(y)
    return y


class QuantResidual(nn.Module):
    """y = Q(post_act(branch(x) + shortcut(x))), shortcut = identity when None."""

    def __init__(self, branch: nn.Module, shortcut: Optional[nn.Module] = None,
                 post_activation: Optional[nn.Module] = None, a_bits: Optional[int] = None,
                 a_observer: str = 'mse') -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        self.post_activation = post_activation
        self.act_quantizer = LSQActQuantizer(a_bits, a_observer) if a_bits is not None else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return _activate_and_quantize(self.branch(x) + identity, self.post_activation, self.act_quantizer)


class QuantOutput(nn.Module):
    """y = Q(module(x)): an activation quantizer on the output of any module (e.g. channel attention)."""

    def __init__(self, module: nn.Module, a_bits: int, a_observer: str = 'mse') -> None:
        super().__init__()
        self.module = module
        self.act_quantizer = LSQActQuantizer(a_bits, a_observer)

    def forward(self, x: Tensor) -> Tensor:
        return self.act_quantizer(self.module(x))
