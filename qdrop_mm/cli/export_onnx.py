"""Export a quantized model to ONNX with Quantize/DequantizeLinear (QDQ form).

    python tools/export_onnx.py CONFIG --quantized work_dirs/NAME/quantized.pth [--out FILE.onnx]
        [--whole [--nms]] [--input-shape 1 3 H W] [--dynamic] [--opset 17] [--check] [--check-image IMG]
        [--evaluate [N]] [--cfg-options k=v ...]

Rebuilds the quantized structure from the config and quantized.pth exactly as
``tools/ptq.py --load-quantized`` does (``qdrop_mm.api.build_quantized_model``),
rewrites weights as integer constants with per-channel DequantizeLinear and
activation quantizers as Clip + QuantizeLinear + DequantizeLinear (see
qdrop_mm/export/onnx_qdq.py), and exports ``extract_feat`` (backbone + neck)
or, with ``--whole``, the whole model with its heads' raw outputs
(qdrop_mm/export/whole.py); ``--nms`` adds box decoding and ONNX
NonMaxSuppression for single-stage detectors. The graph's input is the preprocessed image tensor
(what the model's data_preprocessor outputs: normalised, padded). ``--check``
runs the graph in onnxruntime on a seeded random input (``--check-image``: a
real image through the config's test pipeline) and prints the difference to
the PyTorch fake-quant model; ``--evaluate`` (with ``--whole``) runs the test
split through both and prints the config's metric for each. Bad input prints
``error: <message>`` and exits with status 1. The library side is
qdrop_mm/export/pipeline.py.
"""
from __future__ import annotations

import argparse
import os.path as osp
import tempfile
from typing import Any, Dict, Optional, Sequence

from qdrop_mm.export.pipeline import DEFAULT_SHAPE, output_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='Export a qdrop_mm quantized model to ONNX (QDQ form)')
    p.add_argument('config', help='the config the model was quantized with')
    p.add_argument('--quantized', required=True, metavar='FILE', help='quantized.pth written by tools/ptq.py')
    p.add_argument('--out', help='ONNX file to write (default: next to --quantized, <name>_qdq.onnx, '
                                 '<name>_whole_qdq.onnx with --whole)')
    p.add_argument('--whole', action='store_true',
                   help='the whole model: backbone + neck (QDQ) and the heads\' raw outputs (RPN maps and RoI head '
                        'outputs for given rois; single-stage cls/reg maps; segmentor logits); default: extract_feat')
    p.add_argument('--nms', action='store_true',
                   help='with --whole, single-stage detectors (RetinaNet): box decoding and NMS in the graph (ONNX '
                        'TopK + NonMaxSuppression), outputs dets (N x 5: box in input pixels, score) and labels; '
                        'static input shape, batch 1')
    p.add_argument('--input-shape', type=int, nargs=4, metavar=('N', 'C', 'H', 'W'),
                   help=f'input tensor shape (default {" ".join(map(str, DEFAULT_SHAPE))}, or that of --check-image)')
    p.add_argument('--dynamic', action='store_true', help='dynamic batch, height and width')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset, >= 13 (>= 16 for --whole two-stage; default 17)')
    p.add_argument('--check', action='store_true',
                   help='compare onnxruntime with the PyTorch fake-quant model on a seeded random input')
    p.add_argument('--check-image', metavar='IMG', help='compare on this image (test pipeline + data_preprocessor)')
    p.add_argument('--evaluate', type=int, nargs='?', const=0, metavar='N',
                   help='with --whole: the config\'s metric on the test split (first N images; all without N) for '
                        'the PyTorch model and the graph in onnxruntime\'s default session, one image per run; with N '
                        'the COCO metric still counts every annotated image, so compare the two numbers only)')
    p.add_argument('--activation-storage', choices=['int8', 'uint8'], default='int8',
                   help='int8: zero point 0 (TensorRT, default); uint8: what onnxruntime x86 integer kernels take')
    p.add_argument('--float-bias', action='store_true',
                   help='keep the float biases (default: move them onto the int32 grid s_x*s_w that integer '
                        'kernels and onnxruntime\'s default session use; the PyTorch model is compared with that)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys')
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything cheap, before the model is built; raises ValueError with a one-line message."""
    if not osp.isfile(args.config):
        raise ValueError(f'config file not found: {args.config}')
    if not osp.isfile(args.quantized):
        raise ValueError(f'--quantized file not found: {args.quantized} (the quantized.pth written by tools/ptq.py)')
    if args.input_shape is not None:
        if min(args.input_shape) < 1:
            raise ValueError(f'--input-shape must be 4 positive integers N C H W, got {args.input_shape}')
        if args.input_shape[1] != 3:
            raise ValueError(f'--input-shape: C must be 3 (image channels), got {args.input_shape[1]}')
    if args.opset < 13:
        raise ValueError(f'--opset must be >= 13 (per-channel DequantizeLinear needs opset 13), got {args.opset}')
    if args.check_image is not None and not osp.isfile(args.check_image):
        raise ValueError(f'--check-image file not found: {args.check_image}')
    if args.evaluate is not None and not args.whole:
        raise ValueError('--evaluate needs --whole (the metric needs the heads)')
    if args.nms and not args.whole:
        raise ValueError('--nms needs --whole (decoding needs the heads)')
    if args.nms and args.dynamic:
        raise ValueError('--nms needs a static input shape (no --dynamic)')
    if args.nms and args.input_shape is not None and args.input_shape[0] != 1:
        raise ValueError(f'--nms takes one image: --input-shape N must be 1, got {args.input_shape[0]}')
    if args.evaluate is not None and args.evaluate < 0:
        raise ValueError(f'--evaluate N must be >= 0 (0: every test image), got {args.evaluate}')
    out_dir = osp.dirname(osp.abspath(output_path(args.quantized, args.out, args.whole)))
    try:
        tempfile.TemporaryFile(dir=out_dir).close()  # os.access is not reliable (e.g. for root)
    except OSError as err:
        raise ValueError(f'--out: folder {out_dir} does not exist or is not writable ({err.strerror or err})') from None


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Export; a user-fixable problem raises ``SystemExit('error: <message>')`` (exit status 1)."""
    from qdrop_mm.export.pipeline import export
    from qdrop_mm.openmmlab.runner import exit_on_error
    args = parse_args(argv)
    exit_on_error(check_args, args)
    return exit_on_error(export, args.config, args.quantized, args.out, input_shape=args.input_shape,
                         dynamic=args.dynamic, opset=args.opset, check=args.check, check_image=args.check_image,
                         activation_storage=args.activation_storage, float_bias=args.float_bias, whole=args.whole,
                         evaluate_images=args.evaluate, nms=args.nms, cfg_options=args.cfg_options)


def console() -> None:
    """The console script (``qdrop-export-onnx``): exit status 0, or 1 with one ``error:`` line."""
    main()
