"""Loading and saving checkpoints without unpickling arbitrary code.

torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the
few non-tensor objects an mmengine Runner checkpoint holds (its
``message_hub`` stores ``HistoryBuffer`` objects backed by numpy arrays).
Rather than switching the safety off, the known mmengine and numpy types are
allow-listed; anything else still fails with a message and needs the
explicit ``allow_unsafe`` opt-in.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List

import numpy as np
import torch


def _numpy_safe_globals() -> List[Any]:
    items: List[Any] = [np.ndarray, np.dtype]
    try:
        from numpy.core.multiarray import _reconstruct, scalar
        items += [_reconstruct, scalar]
    except ImportError:  # numpy >= 2 moved these
        from numpy._core.multiarray import _reconstruct, scalar
        items += [_reconstruct, scalar]
    items += [type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32', 'bool')]
    return items


def mmengine_safe_globals() -> List[Any]:
    """Types an mmengine Runner checkpoint may contain besides tensors and plain Python."""
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer] + _numpy_safe_globals()


def safe_load(path: str, map_location: Any = 'cpu', allow_unsafe: bool = False) -> Any:
    """torch.load with weights_only and the allow-list; ``allow_unsafe`` for trusted files only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if allow_unsafe:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(mmengine_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        if 'weights_only' not in str(err) and 'Unsupported global' not in str(err):
            raise
        raise RuntimeError(
            f'{path} contains pickled objects beyond tensors and known mmengine types, so it was not loaded '
            f'(loading it could run arbitrary code). If you trust this file, pass --allow-unsafe-checkpoint. '
            f'Details: {str(err).splitlines()[0]}') from None


def install_safe_mmengine_loading() -> None:
    """Let mmengine's own loaders (``load_from``) read Runner checkpoints under weights_only."""
    torch.serialization.add_safe_globals(mmengine_safe_globals())


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.pth', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def quantized_checkpoint(state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    return {'state_dict': state_dict, 'meta': meta}
