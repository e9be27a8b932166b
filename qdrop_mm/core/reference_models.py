"""Plain-PyTorch ResNet-50 + FPN and MobileNetV2 blocks, quantizable unit by unit.

The same layer shapes as mmdet's ``ResNet(depth=50)`` (stride on the 3x3
conv), ``FPN`` and ``InvertedResidual``, without OpenMMLab, so the speed and
memory benchmarks run wherever torch runs (a GPU machine without mmcv
included). Quantizer placement follows the spec, as the block rules do for
the mmdet modules: inner conv(+ReLU) outputs, block outputs and stand-alone
layers quantized; FPN output convs keep FP outputs.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .placement import block_branch, plain_layers, residual_block
from .ptq import Unit
from .qmodules import QuantLayer, QuantResidual


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int = 1) -> None:
        super().__init__()
        cout = mid * self.expansion
        self.conv1, self.conv2, self.conv3 = _conv_bn(cin, mid, 1), _conv_bn(mid, mid, 3, stride), _conv_bn(mid, cout, 1)
        self.relu = nn.ReLU()
        self.downsample = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y))
        return self.relu(self.conv3(y) + identity)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand, self.dw, self.project = _conv_bn(cin, hidden, 1), _conv_bn(hidden, hidden, 3, stride, hidden), \
            _conv_bn(hidden, cout, 1)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.act(self.dw(self.act(self.expand(x)))))
        return x + y if self.residual else y


class ResNet50FPN(nn.Module):
    """ResNet-50 (stem, 3-4-6-3 Bottlenecks) and a 4-level FPN; ``features`` returns the FPN outputs."""

    def __init__(self, fpn_channels: int = 256) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for i in range(blocks):
                layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
                cin = mid * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        widths = (256, 512, 1024, 2048)
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in widths)
        self.fpn_out = nn.ModuleList(nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1) for _ in widths)

    def features(self, x: Tensor) -> List[Tensor]:
        x = self.pool(self.stem(x))
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode='nearest')
        return [conv(t) for conv, t in zip(self.fpn_out, lat)]


def quantize_bottleneck(block: Bottleneck, w_bits: int, a_bits: int) -> QuantResidual:
    convs = [('conv1', block.conv1[0], block.conv1[1], nn.ReLU()), ('conv2', block.conv2[0], block.conv2[1], nn.ReLU()),
             ('conv3', block.conv3[0], block.conv3[1], None)]
    shortcut = None if block.downsample is None else \
        QuantLayer(block.downsample[0], w_bits, bn=block.downsample[1])
    return residual_block(convs, shortcut, nn.ReLU(), plain_layers(w_bits, a_bits), a_bits)


def quantize_inverted_residual(block: InvertedResidual, w_bits: int, a_bits: int) -> nn.Module:
    convs = [('expand', block.expand[0], block.expand[1], nn.ReLU6()), ('dw', block.dw[0], block.dw[1], nn.ReLU6()),
             ('project', block.project[0], block.project[1], None)]
    branch = block_branch(convs, plain_layers(w_bits, a_bits), residual=block.residual)
    return QuantResidual(branch, None, None, a_bits=a_bits) if block.residual else branch


def quantize_resnet50_fpn(net: ResNet50FPN, w_bits: int, a_bits: int, first_bits: int = 8,
                          stages: Optional[Sequence[int]] = None) -> List[Unit]:
    """Replace stem, blocks and FPN convs in place; returns the units in network order.

    ``stages`` limits the residual stages converted (all by default), e.g. ``(0,)`` for a quick run.
    """
    units = []
    net.stem = QuantLayer(net.stem[0][0], first_bits, bn=net.stem[0][1], activation=nn.ReLU(), a_bits=a_bits)
    units.append(Unit('stem', net.stem, 'layer'))
    for s, stage in enumerate(net.stages):
        if stages is not None and s not in stages:
            continue
        for b in range(len(stage)):
            stage[b] = quantize_bottleneck(stage[b], w_bits, a_bits)
            units.append(Unit(f'layer{s + 1}.{b}', stage[b], 'block'))
    if stages is None:
        for name, convs, out_bits in (('lateral', net.lateral, a_bits), ('fpn_out', net.fpn_out, None)):
            for i in range(len(convs)):
                convs[i] = QuantLayer(convs[i], w_bits, a_bits=out_bits)
                units.append(Unit(f'{name}.{i}', convs[i], 'layer'))
    return units


def features_forward(model: nn.Module, batch: Tensor) -> List[Tensor]:
    return model.features(batch)


@torch.no_grad()
def calibrate_bn_statistics(net: nn.Module, batches: Sequence[Tensor], forward_fn: Callable) -> None:
    """Set every BatchNorm's running statistics to the exact mean/var over ``batches`` (then eval mode)."""
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    for b in batches:
        forward_fn(net, b)
    net.eval()
