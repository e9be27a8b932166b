"""Quantize an mmdet/mmseg model with QDrop (or RTN/AdaRound/BRECQ) and evaluate it.

    python tools/ptq.py configs/faster_rcnn_r50_w4a4.py [--checkpoint CKPT] [--work-dir DIR]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm] [--load-quantized FILE]

Mirrors mmdet's tools/test.py: the config's test loop is replaced by
qdrop_mm's PTQLoop, which calibrates on the train split, reconstructs the
backbone and neck block by block, saves work_dir/quantized.pth, then runs
the standard evaluator and writes work_dir/ptq_report.json.
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
    p.add_argument('--allow-unsafe-checkpoint', action='store_true',
                   help='load checkpoints with full unpickling (only for files you trust)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. ptq.w_bits=2')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_cfg(args: argparse.Namespace):
    """Load and check the config; every problem found here fails before the model is built."""
    from mmengine.config import Config
    from qdrop_mm.openmmlab import PTQSettings
    if not osp.isfile(args.config):
        raise SystemExit(f'error: config file not found: {args.config}')
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
            raise SystemExit(f'error: --load-quantized file not found: {args.load_quantized}')
        cfg.load_from = None
    elif not cfg.get('load_from'):
        raise SystemExit('error: no FP checkpoint: pass --checkpoint or set load_from in the config '
                         '(quantizing random weights is never what you want)')
    elif '://' not in cfg.load_from and not osp.isfile(cfg.load_from):
        raise SystemExit(f'error: checkpoint not found: {cfg.load_from}')
    os.makedirs(cfg.work_dir, exist_ok=True)
    if not os.access(cfg.work_dir, os.W_OK):
        raise SystemExit(f'error: work dir is not writable: {cfg.work_dir}')
    cfg.test_cfg = dict(type='qdrop_mm.PTQLoop', ptq=cfg.get('ptq', {}), load_quantized=args.load_quantized)
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmengine.runner import Runner
    from qdrop_mm.openmmlab import install_safe_mmengine_loading
    try:
        cfg = build_cfg(args)
    except ValueError as err:
        raise SystemExit(f'error: {err}') from None
    install_safe_mmengine_loading(allow_unsafe=args.allow_unsafe_checkpoint)
    runner = Runner.from_cfg(cfg)
    return runner.test()


if __name__ == '__main__':
    main()
