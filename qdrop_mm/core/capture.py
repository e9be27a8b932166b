"""Capture the input of one module while the whole network runs.

The network is driven by a caller-supplied ``forward_fn(model, batch)`` (for
a detector: its feature extraction), so no tracing is needed. The forward is
stopped as soon as the module's input is seen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch
from torch import Tensor, nn

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class CallArgs:
    """What a unit is called with besides its input tensor: plain values only (a transformer block's
    ``hw_shape``), kept per cache entry since they follow the image size."""

    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __call__(self, module: nn.Module, x: Tensor) -> Any:
        """``module(x, *args, **kwargs)``."""
        return module(x, *self.args, **self.kwargs)


NO_ARGS = CallArgs()
Sink = Callable[[Tensor, CallArgs], None]


class _StopForward(Exception):
    pass


def tensors_in(value: Any) -> List[Tensor]:
    """The tensors of a tensor, or of nested tuples/lists/dicts of them (e.g. a forward's result), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def call_args_of(module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, CallArgs]:
    """Split a call into its one input tensor and the plain values beside it; TypeError for more tensors."""
    if not args or not isinstance(args[0], Tensor) or tensors_in((args[1:], kwargs)):
        raise TypeError(f'{type(module).__name__}: a reconstruction unit must take exactly one tensor input '
                        f'(other arguments plain values), got {len(args)} positional and {len(kwargs)} '
                        f'keyword arguments')
    return args[0], (CallArgs(tuple(args[1:]), dict(kwargs)) if len(args) > 1 or kwargs else NO_ARGS)


@torch.no_grad()
def capture_inputs(model: nn.Module, module: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn,
                   sink: Sink, calls: int = 1) -> int:
    """Hand the input tensor of ``module`` and its other arguments for every batch, in order, to ``sink``;
    returns how many.

    ``calls``: how often the forward calls ``module`` per batch (a dense head's conv shared by the
    pyramid levels: once per level); every call's input is one entry, and the forward stops after the
    last of them. Each tensor goes to ``sink`` as soon as it is seen and is not kept here, so a
    budgeted store never holds more than it allows.
    """
    count = 0
    seen = 0

    def hook(mod: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        nonlocal count, seen
        x, call = call_args_of(mod, args, kwargs)
        count += 1
        seen += 1
        sink(x.detach(), call)
        if seen == calls:
            raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
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
