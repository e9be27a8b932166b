"""Quantize an mmdet/mmseg model with QDrop (or RTN/AdaRound/BRECQ) and evaluate it.

    python tools/ptq.py configs/faster_rcnn_r50_w4a4.py [--checkpoint CKPT] [--work-dir DIR]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm] [--load-quantized FILE] [--resume]

Mirrors mmdet's tools/test.py: the config's test loop is replaced by
qdrop_mm's PTQLoop, which calibrates on the train split, reconstructs the
backbone and neck block by block, saves work_dir/quantized.pth, then runs
the standard evaluator and writes work_dir/ptq_report.json.

After every finished unit the state is saved in work_dir/ptq_resume; a run
that was killed continues with ``--resume`` (same config and options) and
gives the same quantized weights as an uninterrupted run. Problems with the
config, checkpoint, data or work dir, and a NaN/inf reconstruction loss,
print ``error: <message>`` and exit with status 1 (no traceback); so does any
unexpected failure (``QDROP_MM_TRACEBACK=1`` shows its traceback).
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='QDrop post-training quantization for OpenMMLab models')
    p.add_argument('config', help='config file (inherits an mmdet/mmseg config and adds a ptq section)')
    p.add_argument('--checkpoint', help='FP checkpoint (path or URL); default: the config\'s load_from')
    p.add_argument('--work-dir', help='where quantized.pth, ptq_report.json and logs go')
    p.add_argument('--load-quantized', metavar='FILE', help='evaluate a saved quantized model, no reconstruction')
    p.add_argument('--resume', action='store_true',
                   help='continue an interrupted run from the last finished unit saved in WORK_DIR/ptq_resume')
    p.add_argument('--allow-unsafe-checkpoint', action='store_true',
                   help='load checkpoints with full unpickling (only for files you trust)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. ptq.w_bits=2')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_cfg(args: argparse.Namespace):
    """Load and check the config; every problem found here fails before the model is built.

    Raises ``ValueError`` (``PTQConfigError``) with a one-line message naming the key / option.
    """
    from mmengine.config import Config
    from qdrop_mm.openmmlab import PTQSettings
    from qdrop_mm.openmmlab.calibration import check_dataset_paths, check_evaluator_paths
    from qdrop_mm.openmmlab.settings import PTQConfigError
    if not osp.isfile(args.config):
        raise PTQConfigError(f'config file not found: {args.config}')
    if args.resume and args.load_quantized:
        raise PTQConfigError('--resume and --load-quantized exclude each other: --resume continues a '
                             'reconstruction, --load-quantized only evaluates a saved model')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    PTQSettings.from_cfg(cfg.get('ptq', {}))
    if args.checkpoint:
        cfg.load_from = args.checkpoint
    if args.load_quantized:
        if not osp.isfile(args.load_quantized):
            raise PTQConfigError(f'--load-quantized file not found: {args.load_quantized}')
        cfg.load_from = None
    elif not cfg.get('load_from'):
        raise PTQConfigError('no FP checkpoint: pass --checkpoint or set load_from in the config '
                             '(quantizing random weights is never what you want)')
    elif '://' not in cfg.load_from:
        if not osp.isfile(cfg.load_from):
            raise PTQConfigError(f'--checkpoint / load_from: checkpoint not found: {cfg.load_from} '
                                 f'(must be an existing file or a URL)')
        try:
            with open(cfg.load_from, 'rb') as f:
                head = f.read(4)
        except OSError as err:
            raise PTQConfigError(f'--checkpoint / load_from: cannot read {cfg.load_from}: {err.strerror}') from None
        if not (head.startswith(b'PK\x03\x04') or head.startswith(b'\x80')):  # torch.save: zip, or legacy pickle
            raise PTQConfigError(f'--checkpoint / load_from: {cfg.load_from} is not a PyTorch checkpoint '
                                 f'(must be a file written by torch.save, e.g. an mmdet/mmseg model-zoo .pth)')
    if not args.load_quantized and cfg.get('train_dataloader') is not None:
        check_dataset_paths(cfg.train_dataloader.get('dataset'), 'train_dataloader.dataset')
    if cfg.get('test_dataloader') is not None:
        check_dataset_paths(cfg.test_dataloader.get('dataset'), 'test_dataloader.dataset')
    if cfg.get('test_evaluator') is not None:
        check_evaluator_paths(cfg.test_evaluator)
    _check_work_dir(cfg.work_dir)
    cfg.test_cfg = dict(type='qdrop_mm.PTQLoop', ptq=cfg.get('ptq', {}), load_quantized=args.load_quantized,
                        resume=bool(args.resume))
    return cfg


def _check_work_dir(work_dir: str) -> None:
    """Create the work dir and prove it is writable by writing a file (os.access lies for root)."""
    import tempfile
    from qdrop_mm.openmmlab.settings import PTQConfigError
    try:
        os.makedirs(work_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=work_dir):
            pass
    except OSError as err:
        raise PTQConfigError(f'--work-dir / work_dir {work_dir} is not a writable folder ({err.strerror or err}); '
                             f'pass --work-dir with a folder you can write to') from None


def init_cpu_distributed(cfg) -> None:
    """``--launcher pytorch`` without CUDA: start a gloo process group before mmengine would try CUDA."""
    import torch
    import torch.distributed as dist
    if cfg.launcher != 'pytorch' or torch.cuda.is_available() or dist.is_initialized():
        return
    backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend', 'gloo')
    dist.init_process_group('gloo' if backend == 'nccl' else backend)


def run_test_loop(cfg, allow_unsafe_checkpoint: bool = False) -> dict:
    """Build the Runner from ``cfg`` and run its test loop (PTQLoop, SensitivityLoop, ...).

    A user-fixable problem raises ``SystemExit('error: <message>')`` (exit status 1, no traceback).
    """
    from mmengine.runner import Runner
    from qdrop_mm.core.unit_cache import CacheBudgetError
    from qdrop_mm.openmmlab import install_safe_mmengine_loading
    from qdrop_mm.openmmlab.checkpoint import UnreadableCheckpointError, UnsafeCheckpointError
    from qdrop_mm.openmmlab.settings import PTQError
    install_safe_mmengine_loading(allow_unsafe=allow_unsafe_checkpoint)
    runner = None
    try:
        runner = Runner.from_cfg(cfg)
        return runner.test()
    except (PTQError, CacheBudgetError) as err:
        message = str(err) if isinstance(err, PTQError) else f'out of cache budget: {err} (ptq.cache)'
        if isinstance(err, (UnreadableCheckpointError, UnsafeCheckpointError)) and cfg.get('load_from') \
                and str(cfg.load_from) in message:
            message = f'--checkpoint / load_from: {message}'
        if runner is not None:
            runner.logger.error(f'error: {message}')
        raise SystemExit(f'error: {message}') from None
    except Exception as err:  # noqa: BLE001  anything else is still one line, never a traceback
        if os.environ.get('QDROP_MM_TRACEBACK'):
            raise
        message = unexpected_error_message(err)
        if runner is not None:
            runner.logger.error(f'error: {message}')
        raise SystemExit(f'error: {message}') from None


def unexpected_error_message(err: BaseException) -> str:
    """One line for a failure qdrop_mm did not anticipate: where it happened and what it was."""
    import traceback
    frames = traceback.extract_tb(err.__traceback__)
    where = f' in {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} ({frames[-1].name})' if frames else ''
    text = (str(err).strip().splitlines() or [''])[0][:300]
    return (f'unexpected {type(err).__name__}{where}: {text} (please report it; '
            f'QDROP_MM_TRACEBACK=1 shows the traceback)')


def main(argv=None) -> dict:
    """Run PTQ; a user-fixable problem raises ``SystemExit('error: <message>')`` (exit status 1)."""
    args = parse_args(argv)
    try:
        cfg = build_cfg(args)
    except ValueError as err:
        raise SystemExit(f'error: {err}') from None
    except Exception as err:  # noqa: BLE001  e.g. a config file mmengine cannot parse
        if os.environ.get('QDROP_MM_TRACEBACK'):
            raise
        raise SystemExit(f'error: {args.config}: {unexpected_error_message(err)}') from None
    init_cpu_distributed(cfg)
    if cfg.launcher != 'none' and cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='qdrop_mm.PTQEvalWrapper')
    return run_test_loop(cfg, args.allow_unsafe_checkpoint)


if __name__ == '__main__':
    main()
