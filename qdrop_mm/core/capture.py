"""Capture the input of one module while the whole network runs.

The network is driven by a caller-supplied ``forward_fn(model, batch)`` (for
a detector: its feature extraction), so no tracing is needed. The forward is
stopped as soon as the module's input is seen.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

ForwardFn = Callable[[nn.Module, Any], Any]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, module: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn,
                   sink: Callable[[Tensor], None], calls: int = 1) -> int:
    """Hand the input tensor of ``module`` for every batch, in order, to ``sink``; returns how many.

    ``calls``: how often the forward calls ``module`` per batch (a dense head's conv shared by the
    pyramid levels: once per level); every call's input is one entry, and the forward stops after the
    last of them. Each tensor goes to ``sink`` as soon as it is seen and is not kept here, so a
    budgeted store never holds more than it allows.
    """
    count = 0
    seen = 0

    def hook(_mod: nn.Module, args: tuple) -> None:
        nonlocal count, seen
        if len(args) != 1 or not isinstance(args[0], Tensor):
            raise TypeError(f'{type(_mod).__name__}: a reconstruction unit must take exactly one tensor input, '
                            f'got {len(args)} positional arguments')
        count += 1
        seen += 1
        sink(args[0].detach())
        if seen == calls:
            raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            seen = 0
            try:
                forward_fn(model, batch)
            except _StopForward:
                pass
            if seen != calls:
                raise RuntimeError(f'{type(module).__name__} was called {seen} time(s) by forward_fn, expected '
                                   f'{calls}; is the unit on the path of the calibration forward?')
    finally:
        handle.remove()
    return count
