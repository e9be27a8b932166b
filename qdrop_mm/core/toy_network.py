"""A small seeded residual network in plain PyTorch, quantizable unit by unit.

Used by the core's tests and by ``tools/bench_block_mse.py`` to compare
methods on one block without OpenMMLab. BN statistics are calibrated on the
seeded data so activations have realistic ranges.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from .ptq import Unit
from .placement import plain_layers, residual_block
from .qmodules import QuantLayer, QuantResidual
from .reference_models import calibrate_bn_statistics, features_forward


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class ToyNet(nn.Module):
    """stem (conv-bn-relu) → block1 → block2 (stride 2) → pooled linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.block2(self.block1(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def smooth_images(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Low-frequency random images (upsampled noise), closer to natural statistics than white noise."""
    low = torch.randn(n, 3, size // 4, size // 4, generator=generator)
    img = nn.functional.interpolate(low, size=(size, size), mode='bilinear', align_corners=False)
    return img + 0.1 * torch.randn(n, 3, size, size, generator=generator)


def make_toy_setup(seed: int = 0, num_batches: int = 8, batch_size: int = 4, size: int = 16,
                   width: int = 16) -> Tuple[ToyNet, List[Tensor]]:
    """Seeded ToyNet with BN statistics set from its data, and calibration batches."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ToyNet(width)
    batches = [smooth_images(batch_size, size, g) for _ in range(num_batches)]
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    calibrate_bn_statistics(net, batches, lambda m, b: m(b))
    return net, batches


def quantize_toy_block(block: BasicBlock, w_bits: int, a_bits: int) -> QuantResidual:
    """BasicBlock → QuantResidual with activation quantizers placed as the spec says."""
    shortcut = None if block.downsample is None else QuantLayer(block.downsample[0], w_bits, bn=block.downsample[1])
    return residual_block([('conv1', block.conv1, block.bn1, nn.ReLU()), ('conv2', block.conv2, block.bn2, None)],
                          shortcut, nn.ReLU(), plain_layers(w_bits, a_bits), a_bits)


def quantize_toy_net(net: ToyNet, w_bits: int, a_bits: int, first_bits: int = 8) -> List[Unit]:
    """Replace stem and blocks in place; the head stays FP. Returns the units in order."""
    net.stem = QuantLayer(net.stem[0], first_bits, bn=net.stem[1], activation=nn.ReLU(), a_bits=a_bits)
    net.block1 = quantize_toy_block(net.block1, w_bits, a_bits)
    net.block2 = quantize_toy_block(net.block2, w_bits, a_bits)
    return [Unit('stem', net.stem, 'layer'), Unit('block1', net.block1, 'block'),
            Unit('block2', net.block2, 'block')]


toy_forward = features_forward  # the toy network's forward_fn: its features, as the reference models'
