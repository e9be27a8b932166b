"""qdrop_mm: QDrop post-training quantization for OpenMMLab detectors and segmentors.

``qdrop_mm.quantize`` / ``load_quantized`` / ``build_quantized_model`` / ``analyze_sensitivity``
(see :mod:`qdrop_mm.api`) are imported on first use, so ``import qdrop_mm.core`` stays free of
OpenMMLab imports.
"""
from typing import Any

_API = ('PTQRun', 'analyze_sensitivity', 'build_quantized_model', 'load_quantized', 'quantize')
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
