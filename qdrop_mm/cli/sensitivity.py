"""Which units hurt most when quantized? Per-unit sensitivity and a mixed-precision suggestion.

    python tools/sensitivity.py configs/faster_rcnn_r50_w2a4.py [--checkpoint CKPT] [--work-dir DIR]
        [--cfg-options k=v ...] [--eval-images N] [--keep-8bit K] [--metric [KEY]] [--parts activations]
        [--quantized quantized.pth]

Builds the model, calibration batches and block plan like tools/ptq.py, quantizes with RTN at the
config's bits (nearest rounding, calibrated activation steps), then quantizes one unit at a time and
measures the relative error of the feature maps (backbone + neck outputs) against FP on --eval-images
held-out train images. ``--metric`` also runs the config's evaluator for FP, all units and each unit
alone (units + 2 full evaluations: slow on a real val set; KEY defaults to box mAP / mask mAP / mIoU)
and ranks by the metric drop. ``--parts activations`` measures each activation quantizer alone with the
weights FP; ``--quantized`` analyses a saved quantized model (e.g. QDrop's) instead of RTN. Writes
work_dir/sensitivity.json and sensitivity.png, prints the ranked table and ``ptq.overrides`` that keep the
--keep-8bit most sensitive units at 8-bit weights and activations. Problems print ``error: <message>``
and exit with status 1, like tools/ptq.py.
"""
from __future__ import annotations

import argparse

def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be an integer >= 0, got {text}')
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='Per-unit quantization sensitivity of an OpenMMLab model (RTN)')
    p.add_argument('config', help='config file (inherits an mmdet/mmseg config and adds a ptq section)')
    p.add_argument('--checkpoint', help='FP checkpoint (path or URL); default: the config\'s load_from')
    p.add_argument('--work-dir', help='where sensitivity.json, sensitivity.png and logs go')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. ptq.w_bits=2')
    p.add_argument('--eval-images', type=_positive_int, default=4,
                   help='held-out train images the feature error is measured on (default 4)')
    p.add_argument('--keep-8bit', type=_non_negative_int, default=2,
                   help='how many of the most sensitive units the suggested overrides keep at 8 bits (default 2)')
    p.add_argument('--metric', nargs='?', const='auto', default=None, metavar='KEY',
                   help='also run the evaluator per unit and rank by the drop of KEY (slow: units + 2 evaluations)')
    p.add_argument('--parts', choices=('units', 'activations'), default='units',
                   help='what is quantized one at a time: units (default), or each activation quantizer with the '
                        'weights FP (what every low-bit activation costs)')
    p.add_argument('--quantized', metavar='PATH',
                   help='analyse this saved quantized model (quantized.pth of tools/ptq.py, e.g. QDrop) instead of RTN')
    p.add_argument('--allow-unsafe-checkpoint', action='store_true',
                   help='load checkpoints with full unpickling (only for files you trust)')
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the analysis; a user-fixable problem raises ``SystemExit('error: <message>')`` (exit status 1)."""
    from qdrop_mm.api import analyze_sensitivity
    from qdrop_mm.openmmlab.runner import exit_on_error
    args = parse_args(argv)
    return exit_on_error(analyze_sensitivity, args.config, args.checkpoint, work_dir=args.work_dir,
                         cfg_options=args.cfg_options, eval_images=args.eval_images, keep_8bit=args.keep_8bit,
                         metric=args.metric, parts=args.parts, quantized=args.quantized,
                         allow_unsafe_checkpoint=args.allow_unsafe_checkpoint)


def console() -> None:
    """The console script (``qdrop-sensitivity``): exit status 0, or 1 with one ``error:`` line."""
    main()
