"""Build a PTQ run's config and run it through mmengine's Runner: the library side of ``tools/ptq.py``.

Every user-fixable problem (config key, path, checkpoint, data, cache budget, a failed unit) surfaces
as :class:`~.settings.PTQError` with a one-line message; the tools print it as ``error: <message>``.
"""
from __future__ import annotations

import os
import os.path as osp
import tempfile
import traceback
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from .settings import PTQConfigError, PTQError, PTQSettings

ConfigLike = Union[str, 'mmengine.config.Config']  # noqa: F821


def parse_cfg_options(items: Sequence[str]) -> Dict[str, Any]:
    """``['key=value', ...]`` as ``--cfg-options`` parses them (mmengine's DictAction: lists, tuples, numbers)."""
    import argparse
    from mmengine.config import DictAction
    namespace = argparse.Namespace(options=None)
    DictAction(option_strings=[], dest='options')(None, namespace, list(items))
    return namespace.options or {}


def load_config(config: ConfigLike, cfg_options: Optional[Mapping[str, Any]] = None):
    """An mmengine ``Config`` from a path (or a copy of a ``Config``), with ``cfg_options`` merged."""
    from mmengine.config import Config
    if isinstance(config, Config):
        cfg = config.copy()
    else:
        if not osp.isfile(config):
            raise PTQConfigError(f'config file not found: {config}')
        try:
            cfg = Config.fromfile(config)
        except Exception as err:  # noqa: BLE001  e.g. a _base_ that does not exist: still one line
            if os.environ.get('QDROP_MM_TRACEBACK'):
                raise
            raise PTQConfigError(f'{config}: {unexpected_error_message(err)}') from None
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    return cfg


def build_ptq_cfg(config: ConfigLike, checkpoint: Optional[str] = None, work_dir: Optional[str] = None,
                  cfg_options: Optional[Mapping[str, Any]] = None, load_quantized: Optional[str] = None,
                  resume: bool = False, launcher: str = 'none', loop: str = 'qdrop_mm.PTQLoop',
                  **loop_args: Any):
    """The run's config, checked: every problem found here fails before the model is built.

    The config's test loop becomes ``loop`` (``PTQLoop`` by default) with the ``ptq`` settings and
    ``loop_args``. Raises :class:`PTQConfigError` with a one-line message naming the key / option.
    """
    from .calibration import check_dataset_paths, check_evaluator_paths
    check_exclusive(resume, load_quantized)
    cfg = load_config(config, cfg_options)
    cfg.launcher = launcher
    if work_dir:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        name = osp.splitext(osp.basename(config))[0] if isinstance(config, str) else 'ptq'
        cfg.work_dir = osp.join('./work_dirs', name)
    PTQSettings.from_cfg(cfg.get('ptq', {}))
    if checkpoint:
        cfg.load_from = checkpoint
    if load_quantized:
        if not osp.isfile(load_quantized):
            raise PTQConfigError(f'--load-quantized file not found: {load_quantized}')
        cfg.load_from = None
    else:
        check_fp_checkpoint(cfg.get('load_from'))
    if not load_quantized and cfg.get('train_dataloader') is not None:
        check_dataset_paths(cfg.train_dataloader.get('dataset'), 'train_dataloader.dataset')
    if cfg.get('test_dataloader') is not None:
        check_dataset_paths(cfg.test_dataloader.get('dataset'), 'test_dataloader.dataset')
    if cfg.get('test_evaluator') is not None:
        check_evaluator_paths(cfg.test_evaluator)
    check_work_dir(cfg.work_dir)
    if loop == 'qdrop_mm.PTQLoop':
        loop_args = dict(loop_args, load_quantized=load_quantized, resume=bool(resume))
    cfg.test_cfg = dict(type=loop, ptq=cfg.get('ptq', {}), **loop_args)
    if launcher != 'none' and cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='qdrop_mm.PTQEvalWrapper')
    return cfg


def check_exclusive(resume: bool, load_quantized: Optional[str]) -> None:
    """``resume`` continues a reconstruction, ``load_quantized`` skips it: never both."""
    if resume and load_quantized:
        raise PTQConfigError('--resume and --load-quantized exclude each other: --resume continues a '
                             'reconstruction, --load-quantized only evaluates a saved model')


def check_fp_checkpoint(load_from: Optional[str]) -> None:
    """The FP checkpoint is a URL or an existing torch.save file; quantizing random weights is refused."""
    if not load_from:
        raise PTQConfigError('no FP checkpoint: pass --checkpoint or set load_from in the config '
                             '(quantizing random weights is never what you want)')
    if '://' in load_from:
        return
    if not osp.isfile(load_from):
        raise PTQConfigError(f'--checkpoint / load_from: checkpoint not found: {load_from} '
                             f'(must be an existing file or a URL)')
    try:
        with open(load_from, 'rb') as f:
            head = f.read(4)
    except OSError as err:
        raise PTQConfigError(f'--checkpoint / load_from: cannot read {load_from}: {err.strerror}') from None
    if not (head.startswith(b'PK\x03\x04') or head.startswith(b'\x80')):  # torch.save: zip, or legacy pickle
        raise PTQConfigError(f'--checkpoint / load_from: {load_from} is not a PyTorch checkpoint '
                             f'(must be a file written by torch.save, e.g. an mmdet/mmseg model-zoo .pth)')


def check_work_dir(work_dir: str) -> None:
    """Create the work dir and prove it is writable by writing a file (os.access lies for root)."""
    try:
        os.makedirs(work_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=work_dir):
            pass
    except OSError as err:
        raise PTQConfigError(f'--work-dir / work_dir {work_dir} is not a writable folder ({err.strerror or err}); '
                             f'pass --work-dir with a folder you can write to') from None


def init_cpu_distributed(cfg) -> None:
    """``launcher='pytorch'`` without CUDA: start a gloo process group before mmengine would try CUDA."""
    import torch
    import torch.distributed as dist
    if cfg.launcher != 'pytorch' or torch.cuda.is_available() or dist.is_initialized():
        return
    backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend', 'gloo')
    dist.init_process_group('gloo' if backend == 'nccl' else backend)


def run_test_loop(cfg, allow_unsafe_checkpoint: bool = False, hooks: Sequence[Any] = ()) -> Tuple[dict, Any]:
    """Build the Runner from ``cfg`` and run its test loop (PTQLoop, SensitivityLoop, ...): (metrics, runner).

    ``hooks`` are registered on the Runner at the lowest priority (e.g. one that keeps the predictions).
    A user-fixable problem raises :class:`PTQError` with a one-line message (also logged); anything
    else propagates after its one-line description is logged.
    """
    from mmengine.runner import Runner
    from qdrop_mm.core.unit_cache import CacheBudgetError
    from .checkpoint import UnreadableCheckpointError, UnsafeCheckpointError, install_safe_mmengine_loading
    install_safe_mmengine_loading(allow_unsafe=allow_unsafe_checkpoint)
    init_cpu_distributed(cfg)
    runner = None
    try:
        runner = Runner.from_cfg(cfg)
        for hook in hooks:
            runner.register_hook(hook, priority='LOWEST')
        return runner.test(), runner
    except (PTQError, CacheBudgetError) as err:
        message = str(err) if isinstance(err, PTQError) else f'out of cache budget: {err} (ptq.cache)'
        if isinstance(err, (UnreadableCheckpointError, UnsafeCheckpointError)) and cfg.get('load_from') \
                and str(cfg.load_from) in message and not message.startswith('--checkpoint'):
            message = f'--checkpoint / load_from: {message}'
        if runner is not None:
            runner.logger.error(f'error: {message}')
        if message == str(err) and isinstance(err, PTQError):
            raise
        raise PTQError(message) from None
    except Exception as err:
        if runner is not None:
            runner.logger.error(f'error: {unexpected_error_message(err)}')
        raise


def unexpected_error_message(err: BaseException) -> str:
    """One line for a failure qdrop_mm did not anticipate: where it happened and what it was."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f' in {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} ({frames[-1].name})' if frames else ''
    text = (str(err).strip().splitlines() or [''])[0][:300]
    return (f'unexpected {type(err).__name__}{where}: {text} (please report it; '
            f'QDROP_MM_TRACEBACK=1 shows the traceback)')


def exit_on_error(fn, *args: Any, context: str = '', **kwargs: Any) -> Any:
    """Call ``fn``; a user-fixable problem becomes ``SystemExit('error: <message>')`` (exit status 1), never a
    traceback, and so does any unexpected failure unless ``QDROP_MM_TRACEBACK`` is set. For the tools' ``main``."""
    try:
        return fn(*args, **kwargs)
    except (PTQError, ValueError, ImportError) as err:
        raise SystemExit(f'error: {context}{err}') from None
    except Exception as err:  # noqa: BLE001  anything else is still one line
        if os.environ.get('QDROP_MM_TRACEBACK'):
            raise
        raise SystemExit(f'error: {context}{unexpected_error_message(err)}') from None
