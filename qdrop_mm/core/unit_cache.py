"""Cached FP inputs, quantized inputs and FP targets of one reconstruction unit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class UnitCache:
    """Per calibration batch: x_fp, x_q and target tensors (kept on ``store`` device).

    When every entry has the same shape the cache is sampled row-wise with
    replacement (classification protocol, any batch size); otherwise one whole
    entry is drawn per iteration (detection: images of different sizes).
    """

    x_fp: List[Tensor]
    x_q: List[Tensor]
    target: List[Tensor]

    def __post_init__(self) -> None:
        if not (len(self.x_fp) == len(self.x_q) == len(self.target)) or not self.x_fp:
            raise ValueError('x_fp, x_q and target must be non-empty lists of equal length')
        same = len({tuple(t.shape) for t in self.x_fp}) == 1 and len({tuple(t.shape) for t in self.target}) == 1
        self._stacked: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        if same:
            self._stacked = (torch.cat(self.x_fp), torch.cat(self.x_q), torch.cat(self.target))

    def __len__(self) -> int:
        return len(self.x_fp)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.x_fp, self.x_q, self.target) for t in ts)

    def sample(self, batch_size: Optional[int], device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
        """One training batch (x_fp, x_q, target) on ``device``."""
        if self._stacked is not None and batch_size is not None:
            idx = torch.randint(0, self._stacked[0].shape[0], (batch_size,))
            return tuple(t[idx].to(device, non_blocking=True) for t in self._stacked)
        i = int(torch.randint(0, len(self), ()).item())
        return self.x_fp[i].to(device), self.x_q[i].to(device), self.target[i].to(device)
