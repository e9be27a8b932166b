"""Capture the input of one module while the whole network runs.

The network is driven by a caller-supplied ``forward_fn(model, batch)`` (for
a detector: its feature extraction), so no tracing is needed. The forward is
stopped as soon as the module's input is seen.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional

import torch
from torch import Tensor, nn

ForwardFn = Callable[[nn.Module, Any], Any]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, module: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn,
                   store_device: torch.device = torch.device('cpu'),
                   sink: Optional[Callable[[Tensor], None]] = None) -> List[Tensor]:
    """Input tensor of ``module`` for every batch, in order.

    With ``sink`` each tensor is handed over as soon as it is seen (and not kept),
    so a budgeted store never holds more than it allows.
    """
    seen: List[Tensor] = []
    count = [0]

    def hook(_mod: nn.Module, args: tuple) -> None:
        if len(args) != 1 or not isinstance(args[0], Tensor):
            raise TypeError(f'{type(_mod).__name__}: a reconstruction unit must take exactly one tensor input, '
                            f'got {len(args)} positional arguments')
        count[0] += 1
        if sink is not None:
            sink(args[0].detach())
        else:
            seen.append(args[0].detach().to(store_device))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            n = count[0]
            try:
                forward_fn(model, batch)
            except _StopForward:
                pass
            if count[0] != n + 1:
                raise RuntimeError(f'{type(module).__name__} was not called by forward_fn; '
                                   'is the unit on the path of the calibration forward?')
    finally:
        handle.remove()
    return seen
