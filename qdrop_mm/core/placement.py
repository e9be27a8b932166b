"""Where a block's activation quantizers go (the QDrop spec), written once.

Inside a block every conv(+activation) output is quantized except the last conv's (its output joins
the shortcut first) and the shortcut's; the block output, after the add and the activation, is
quantized. A block without a shortcut add quantizes its last output like any other. The OpenMMLab
block rules, the plain reference models of the speed benchmark and the toy network all build their
blocks here, each with its own ``make_layer`` (how bits and observers are chosen).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from torch import nn

from .qmodules import QuantLayer, QuantResidual

# make_layer(name, conv, bn, activation, quantize_output) -> the quantized layer
LayerFactory = Callable[[str, nn.Module, Optional[nn.Module], Optional[nn.Module], bool], nn.Module]
# (name, conv, bn, activation) of one branch conv; conv may be a wrapper the factory unpacks (ConvModule)
ConvSpec = Tuple[str, nn.Module, Optional[nn.Module], Optional[nn.Module]]


def block_branch(convs: Sequence[ConvSpec], make_layer: LayerFactory, residual: bool = True) -> nn.Sequential:
    """The branch convs in order, each output quantized except the last one's when ``residual`` (it joins
    the shortcut first; the block's own quantizer follows the add)."""
    return nn.Sequential(*[make_layer(name, conv, bn, act, not (residual and i == len(convs) - 1))
                           for i, (name, conv, bn, act) in enumerate(convs)])


def residual_block(convs: Sequence[ConvSpec], shortcut: Optional[nn.Module], out_activation: Optional[nn.Module],
                   make_layer: LayerFactory, a_bits: int, a_observer: str = 'mse') -> QuantResidual:
    """``branch(x) + shortcut(x)`` (identity without one), then ``out_activation``, then the block's quantizer."""
    return QuantResidual(block_branch(convs, make_layer), shortcut, out_activation, a_bits, a_observer)


def plain_layers(w_bits: int, a_bits: int) -> LayerFactory:
    """A factory giving every layer the same bits and the default observers (reference models, toy network)."""
    def make(name: str, conv: nn.Module, bn: Optional[nn.Module], act: Optional[nn.Module], quantize: bool):
        return QuantLayer(conv, w_bits, bn=bn, activation=act, a_bits=a_bits if quantize else None)
    return make
