"""Switch the quantizers of a model or unit on and off, restoring on exit."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

from torch import nn

from .adaround import AdaRoundQuantizer
from .lsq import LSQActQuantizer


def weight_quantizers(module: nn.Module) -> List[AdaRoundQuantizer]:
    return [m for m in module.modules() if isinstance(m, AdaRoundQuantizer)]


def act_quantizers(module: nn.Module) -> List[LSQActQuantizer]:
    return [m for m in module.modules() if isinstance(m, LSQActQuantizer)]


@contextmanager
def quant_state(module: nn.Module, weight: Optional[bool] = None, act: Optional[bool] = None,
                drop_prob: Optional[float] = None) -> Iterator[None]:
    """Temporarily enable/disable weight and activation quantizers (None = leave as is)."""
    wqs, aqs = weight_quantizers(module), act_quantizers(module)
    saved = ([q.enabled for q in wqs], [(q.enabled, q.drop_prob) for q in aqs])
    try:
        if weight is not None:
            for q in wqs:
                q.enabled = weight
        for q in aqs:
            if act is not None:
                q.enabled = act
            if drop_prob is not None:
                q.drop_prob = drop_prob
        yield
    finally:
        for q, e in zip(wqs, saved[0]):
            q.enabled = e
        for q, (e, p) in zip(aqs, saved[1]):
            q.enabled, q.drop_prob = e, p
