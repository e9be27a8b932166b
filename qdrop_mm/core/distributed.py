"""The core's one touchpoint with torch.distributed: sums and means over ranks, no-ops in one process."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group (1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over ranks, in place."""
    if world_size() > 1:
        for t in tensors:
            torch.distributed.all_reduce(t)


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average each tensor over ranks, in place."""
    world = world_size()
    if world > 1:
        all_reduce_sum_(tensors)
        for t in tensors:
            t /= world
