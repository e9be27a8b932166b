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


def main(argv=None) -> dict:
    """Run PTQ (or evaluate ``--load-quantized``); a user-fixable problem raises ``SystemExit('error: <message>')``."""
    from qdrop_mm.api import load_quantized, quantize
    from qdrop_mm.openmmlab.runner import check_exclusive, exit_on_error
    args = parse_args(argv)
    exit_on_error(check_exclusive, args.resume, args.load_quantized)
    common = dict(work_dir=args.work_dir, cfg_options=args.cfg_options, launcher=args.launcher,
                  allow_unsafe_checkpoint=args.allow_unsafe_checkpoint)
    if args.load_quantized:
        return exit_on_error(load_quantized, args.config, args.load_quantized, **common).metrics
    return exit_on_error(quantize, args.config, args.checkpoint, resume=args.resume, **common).metrics


def console() -> None:
    """The console script (``qdrop-ptq``): exit status 0, or 1 with one ``error:`` line."""
    main()
