"""Loading and saving checkpoints without unpickling arbitrary code.

torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the
few non-tensor objects an mmengine Runner checkpoint holds: its
``message_hub`` stores ``HistoryBuffer`` objects backed by numpy arrays, and
pickles their statistics methods as ``getattr(HistoryBuffer, 'mean')``.
Rather than switching the safety off, those known types are allow-listed:
torch's own weights-only allow-list plus HistoryBuffer and numpy's array
reconstruction, and ``getattr`` only on HistoryBuffer for its public
statistics. Anything else still fails with a message and needs the explicit
``allow_unsafe`` opt-in.
"""
from __future__ import annotations

import codecs
import os
import pickle
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


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is not HistoryBuffer or name.startswith('_') or name not in vars(HistoryBuffer):
        raise pickle.UnpicklingError(f'getattr({obj!r}, {name!r}) is not allowed in a checkpoint')
    return getattr(obj, name)


class _RunnerCheckpointUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (torch's weights-only set + mmengine's)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (('builtins', 'getattr'), ('__builtin__', 'getattr')):
            return _history_buffer_getattr
        allowed = _allowed_globals()
        key = f'{module}.{name}'
        if key not in allowed:
            raise pickle.UnpicklingError(f'Unsupported global: {key} is not allow-listed')
        return allowed[key]


def _allowed_globals() -> Dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals
    allowed = dict(_get_allowed_globals())
    allowed['_codecs.encode'] = codecs.encode
    for obj in mmengine_safe_globals():
        allowed[f'{obj.__module__}.{obj.__qualname__}'] = obj
        allowed[f'{obj.__module__}.{obj.__name__}'] = obj
    allowed['numpy.dtype'] = np.dtype
    allowed['numpy.ndarray'] = np.ndarray
    return allowed


class _RunnerPickleModule:
    """A ``pickle_module`` for torch.load that uses the restricted unpickler."""

    Unpickler = _RunnerCheckpointUnpickler
    load = staticmethod(pickle.load)
    __name__ = 'qdrop_mm_restricted_pickle'


def safe_load(path: str, map_location: Any = 'cpu', allow_unsafe: bool = False) -> Any:
    """Load a checkpoint resolving only allow-listed types; ``allow_unsafe`` for trusted files only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if allow_unsafe:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_RunnerPickleModule)
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f'{path} contains pickled objects beyond tensors and known mmengine types, so it was not loaded '
            f'(loading it could run arbitrary code). If you trust this file, pass --allow-unsafe-checkpoint. '
            f'Details: {err}') from None


def install_safe_mmengine_loading(allow_unsafe: bool = False) -> None:
    """Route mmengine's loading of local checkpoints (``load_from``) through :func:`safe_load`."""
    from mmengine.runner import CheckpointLoader

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        return safe_load(os.path.expanduser(filename), map_location=map_location, allow_unsafe=allow_unsafe)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


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
