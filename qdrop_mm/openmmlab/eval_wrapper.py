"""A model wrapper for distributed PTQ runs, in place of DistributedDataParallel.

PTQ never trains the wrapped model: reconstruction averages its own
gradients across ranks (see the core), and evaluation only needs each rank
to run its shard. DDP would add nothing but a device requirement (it refuses
CPU modules with device ids), so distributed PTQ uses this thin wrapper.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class PTQEvalWrapper(nn.Module):
    """Holds the model as ``.module`` (mmengine's wrapper convention) and forwards val/test steps."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def val_step(self, data: Any) -> Any:
        return self.module.val_step(data)

    def test_step(self, data: Any) -> Any:
        return self.module.test_step(data)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
