"""Bit budget of a quantized module: how many weights and activation quantizers sit at each bit width.

Average weight bits are weighted by the number of weights (what the weights cost in memory);
average activation bits are weighted by the number of activation quantizers (each quantized
tensor counts once, whatever its size, since sizes depend on the input resolution).
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, Optional

from torch import nn

from .adaround import AdaRoundQuantizer
from .quant_state import act_quantizers


def weight_bit_counts(module: nn.Module) -> Dict[int, int]:
    """bits -> number of weights quantized at that width, over the quantized layers inside ``module``."""
    counts: Counter = Counter()
    for m in module.modules():
        q = getattr(m, 'weight_quantizer', None)
        if isinstance(q, AdaRoundQuantizer):
            counts[q.bits] += m.weight.numel()
    return dict(counts)


def act_bit_counts(module: nn.Module) -> Dict[int, int]:
    """bits -> number of activation quantizers at that width inside ``module``."""
    return dict(Counter(q.bits for q in act_quantizers(module)))


def merge_counts(counts: Iterable[Dict[int, int]]) -> Dict[int, int]:
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return dict(total)


def average_bits(counts: Dict[int, int]) -> Optional[float]:
    """Mean bit width weighted by the counts; None when nothing is counted."""
    n = sum(counts.values())
    return sum(b * c for b, c in counts.items()) / n if n else None
