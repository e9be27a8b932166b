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
import re
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from .atomic_io import atomic_write
from .settings import PTQConfigError, PTQError


class CheckpointNotFoundError(PTQConfigError, FileNotFoundError):
    """The checkpoint file does not exist."""


class UnreadableCheckpointError(PTQConfigError):
    """The file exists but is not a readable PyTorch checkpoint (truncated, corrupted, not a checkpoint)."""


class UnsafeCheckpointError(PTQError, RuntimeError):
    """The checkpoint pickles objects beyond the allow-list; needs --allow-unsafe-checkpoint."""


class CheckpointMismatchError(PTQConfigError):
    """The checkpoint's keys or shapes do not fit the model."""


class _RefusedGlobal(pickle.UnpicklingError):
    """Raised by the restricted unpickler for a global that is not allow-listed."""


def mmengine_safe_globals() -> List[Any]:
    """Types an mmengine Runner checkpoint may contain besides tensors and plain Python."""
    from mmengine.logging.history_buffer import HistoryBuffer
    try:
        from numpy.core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy >= 2 moved these
        from numpy._core.multiarray import _reconstruct, scalar
    return [HistoryBuffer, np.ndarray, np.dtype, _reconstruct, scalar] + [
        type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32', 'bool')]


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    from mmengine.logging.history_buffer import HistoryBuffer
    if obj is not HistoryBuffer or name.startswith('_') or name not in vars(HistoryBuffer):
        raise _RefusedGlobal(f'getattr({obj!r}, {name!r}) is not allowed in a checkpoint')
    return getattr(obj, name)


class _RunnerCheckpointUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (torch's weights-only set + mmengine's)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (('builtins', 'getattr'), ('__builtin__', 'getattr')):
            return _history_buffer_getattr
        allowed = _allowed_globals()
        key = f'{module}.{name}'
        if key not in allowed:
            raise _RefusedGlobal(f'Unsupported global: {key} is not allow-listed')
        return allowed[key]


def _allowed_globals() -> Dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals
    allowed = dict(_get_allowed_globals())
    allowed['_codecs.encode'] = codecs.encode
    for obj in mmengine_safe_globals():
        allowed[f'{obj.__module__}.{obj.__qualname__}'] = obj
        allowed[f'{obj.__module__}.{obj.__name__}'] = obj
    return allowed


class _RunnerPickleModule:
    """A ``pickle_module`` for torch.load that uses the restricted unpickler."""

    Unpickler = _RunnerCheckpointUnpickler
    load = staticmethod(pickle.load)
    __name__ = 'qdrop_mm_restricted_pickle'


def safe_load(path: str, map_location: Any = 'cpu', allow_unsafe: bool = False) -> Any:
    """Load a checkpoint resolving only allow-listed types; ``allow_unsafe`` for trusted files only.

    A missing file raises :class:`CheckpointNotFoundError`, a file torch cannot read (truncated,
    corrupted, not a checkpoint) :class:`UnreadableCheckpointError`, a file with other pickled
    objects :class:`UnsafeCheckpointError`; all carry a one-line message.
    """
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f'checkpoint not found: {path}')
    try:
        if allow_unsafe:
            return torch.load(path, map_location=map_location, weights_only=False)
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            pass
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_RunnerPickleModule)
    except _RefusedGlobal as err:
        raise UnsafeCheckpointError(
            f'{path} contains pickled objects beyond tensors and known mmengine types, so it was not loaded '
            f'(loading it could run arbitrary code). If you trust this file, pass --allow-unsafe-checkpoint. '
            f'Details: {err}') from None
    except (OSError, EOFError, KeyError, RuntimeError, ValueError, pickle.UnpicklingError, UnicodeDecodeError,
            AttributeError, ImportError, IndexError, TypeError) as err:
        lines = str(err).strip().splitlines()
        raise UnreadableCheckpointError(
            f'cannot read checkpoint {path}: not a PyTorch checkpoint or damaged '
            f'({type(err).__name__}: {lines[0][:200] if lines else repr(err)})') from None


def install_safe_mmengine_loading(allow_unsafe: bool = False) -> None:
    """Route mmengine's loading of local checkpoints (``load_from``) through :func:`safe_load`."""
    from mmengine.runner import CheckpointLoader

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        return safe_load(os.path.expanduser(filename), map_location=map_location, allow_unsafe=allow_unsafe)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def quantized_checkpoint(state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    return {'state_dict': state_dict, 'meta': meta}


IGNORED_KEY_SUFFIXES = ('num_batches_tracked',)


def checkpoint_state_dict(checkpoint: Any) -> Dict[str, Any]:
    """The model weights of a loaded checkpoint, keys revised like mmengine (``module.`` prefix dropped)."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f'the checkpoint holds a {type(state).__name__}, not a state dict')
    return {re.sub(r'^module\.', '', k): v for k, v in state.items()}


def state_dict_mismatch(model: nn.Module, state: Dict[str, Any]) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, shape-mismatched) keys of ``state`` against ``model``; BN counters ignored."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(IGNORED_KEY_SUFFIXES)}
    given = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEY_SUFFIXES)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(f'{k}: checkpoint {tuple(getattr(given[k], "shape", ()))} vs model {expected[k]}'
                    for k in set(expected) & set(given)
                    if tuple(getattr(given[k], 'shape', ())) != expected[k])
    return missing, unexpected, shapes


def check_checkpoint_fits(model: nn.Module, checkpoint: Any, source: str) -> None:
    """Fail (with counts and a few example keys) when a checkpoint's weights do not fit ``model``.

    mmengine loads ``load_from`` non-strictly and only warns; quantizing a half-random model is
    never what a user wants, so any missing, unexpected or wrongly shaped key is an error.
    """
    missing, unexpected, shapes = state_dict_mismatch(model, checkpoint_state_dict(checkpoint))
    if not (missing or unexpected or shapes):
        return
    parts = [f'{len(keys)} {what} key{"s" if len(keys) != 1 else ""} (e.g. {keys[:3]})'
             for what, keys in (('missing', missing), ('unexpected', unexpected), ('shape-mismatched', shapes)) if keys]
    raise CheckpointMismatchError(
        f'checkpoint {source} (--checkpoint / load_from) does not fit the {type(model).__name__} built from the '
        f'config: {", ".join(parts)}; use the checkpoint trained with this config')
