"""Export a quantized model's backbone + neck (``model.extract_feat``) to ONNX with Quantize/DequantizeLinear.

    python tools/export_onnx.py CONFIG --quantized work_dirs/NAME/quantized.pth [--out FILE.onnx]
        [--input-shape 1 3 H W] [--dynamic] [--opset 17] [--check] [--check-image IMG]
        [--cfg-options k=v ...]

Rebuilds the quantized structure from the config and quantized.pth exactly as
``tools/ptq.py --load-quantized`` does, rewrites weights as integer constants
with per-channel DequantizeLinear and activation quantizers as Clip +
QuantizeLinear + DequantizeLinear (see qdrop_mm/export/onnx_qdq.py), and
exports ``extract_feat``. The graph's input is the preprocessed image tensor
(what the model's data_preprocessor outputs: normalised, padded); its outputs
are the neck's feature maps. ``--check`` runs the graph in onnxruntime on a
seeded random input (``--check-image``: a real image through the config's
test pipeline) and prints the difference to the PyTorch fake-quant model.
Bad input prints ``error: <message>`` and exits with status 1.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

DEFAULT_SHAPE = (1, 3, 800, 1344)


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='Export a qdrop_mm quantized backbone + neck to ONNX (QDQ form)')
    p.add_argument('config', help='the config the model was quantized with')
    p.add_argument('--quantized', required=True, metavar='FILE', help='quantized.pth written by tools/ptq.py')
    p.add_argument('--out', help='ONNX file to write (default: next to --quantized, <name>_qdq.onnx)')
    p.add_argument('--input-shape', type=int, nargs=4, metavar=('N', 'C', 'H', 'W'),
                   help=f'input tensor shape (default {" ".join(map(str, DEFAULT_SHAPE))}, or that of --check-image)')
    p.add_argument('--dynamic', action='store_true', help='dynamic batch, height and width')
    p.add_argument('--opset', type=int, default=17, help='ONNX opset, >= 13 (default 17)')
    p.add_argument('--check', action='store_true',
                   help='compare onnxruntime with the PyTorch fake-quant model on a seeded random input')
    p.add_argument('--check-image', metavar='IMG', help='compare on this image (test pipeline + data_preprocessor)')
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
        n, c, h, w = args.input_shape
        if min(args.input_shape) < 1:
            raise ValueError(f'--input-shape must be 4 positive integers N C H W, got {args.input_shape}')
        if c != 3:
            raise ValueError(f'--input-shape: C must be 3 (image channels), got {c}')
    if args.opset < 13:
        raise ValueError(f'--opset must be >= 13 (per-channel DequantizeLinear needs opset 13), got {args.opset}')
    if args.check_image is not None and not osp.isfile(args.check_image):
        raise ValueError(f'--check-image file not found: {args.check_image}')
    out_dir = osp.dirname(osp.abspath(output_path(args)))
    try:
        with tempfile.TemporaryFile(dir=out_dir):  # os.access is not reliable (e.g. for root)
            pass
    except OSError as err:
        raise ValueError(f'--out: folder {out_dir} does not exist or is not writable ({err.strerror or err})') from None


def output_path(args: argparse.Namespace) -> str:
    return args.out or osp.splitext(args.quantized)[0] + '_qdq.onnx'


def image_input(cfg, model, path: str):
    """A real image as the model sees it: the config's test pipeline (no annotations), then data_preprocessor."""
    import torch
    from mmengine.dataset import Compose
    steps = [t for t in cfg.test_dataloader.dataset.pipeline if 'LoadAnnotations' not in t['type']]
    data = Compose(steps)(dict(img_path=path, img_id=0))
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
    return batch['inputs']


def input_tensor(args: argparse.Namespace, cfg, model):
    from qdrop_mm.export import random_input
    if args.check_image is None:
        return random_input(tuple(args.input_shape or DEFAULT_SHAPE))
    x = image_input(cfg, model, args.check_image)
    if args.input_shape is not None and tuple(args.input_shape) != tuple(x.shape):
        raise ValueError(f'--input-shape {args.input_shape} differs from the preprocessed --check-image shape '
                         f'{list(x.shape)}: leave --input-shape out, or export with --dynamic')
    return x


def export(args: argparse.Namespace) -> Dict[str, Any]:
    from qdrop_mm.export import (MethodForward, compare_outputs, describe_rounding, export_onnx, first_divergence,
                                 prepare_export, qdq_node_counts, quantizer_agreement, reference_outputs,
                                 run_onnxruntime)
    from qdrop_mm.export.onnx_io import require_onnx
    from qdrop_mm.api import build_quantized_model
    require_onnx()
    cfg, model = build_quantized_model(args.config, args.quantized, args.cfg_options)
    if not hasattr(model, 'extract_feat'):
        raise ValueError(f'{type(model).__name__} has no extract_feat: only detectors and segmentors are supported')
    x = input_tensor(args, cfg, model)
    prepared = prepare_export(model, lambda m: m.extract_feat(x), args.activation_storage, not args.float_bias)
    exported, summary = prepared.module, prepared.summary
    out = output_path(args)
    graph_module = MethodForward(exported, 'extract_feat')
    export_onnx(graph_module, x, out, opset=args.opset, dynamic=args.dynamic)
    nodes = qdq_node_counts(out)
    print(f'wrote {out}: input {list(x.shape)} (preprocessed image), outputs = extract_feat (backbone + neck)')
    print(f'  {summary.describe()}')
    if not args.float_bias:
        print(f'  {describe_rounding(prepared.biases)}')
    print(f'  graph: {nodes.get("QuantizeLinear", 0)} QuantizeLinear, {nodes.get("DequantizeLinear", 0)} '
          f'DequantizeLinear, {nodes.get("Clip", 0)} Clip')
    if summary.uint8_tensors:
        print(f'  note: {len(summary.uint8_tensors)} tensor(s) stored as UINT8: valid ONNX and exact in onnxruntime, '
              f'but TensorRT takes only INT8 with zero point 0, e.g. {summary.uint8_tensors[:3]}')
    result: Dict[str, Any] = {'out': out, 'summary': summary, 'nodes': nodes, 'parity': None,
                              'biases': prepared.biases, 'model': model}
    if args.check or args.check_image:
        reference = reference_outputs(MethodForward(model, 'extract_feat'), x)
        result['parity'] = compare_outputs(reference, run_onnxruntime(out, x))
        result['parity_bias_int32'] = compare_outputs(reference, run_onnxruntime(out, x, quantize_bias=True))
        source = args.check_image or 'seeded random input'
        print(f'onnxruntime vs PyTorch fake-quant ({source}): {result["parity"].describe()}')
        print(f'  onnxruntime default session (rounds conv biases to int32 at scale s_x*s_w'
              f'{"" if args.float_bias else ": already on that grid"}): {result["parity_bias_int32"].describe()}')
        result['agreement'] = quantizer_agreement(out, graph_module, x)
        first = first_divergence(result['agreement'])
        if first is None:
            print(f'  all {len(result["agreement"])} activation quantizers give identical integers')
        else:
            print(f'  first activation quantizer that differs: {first.name.removeprefix("model.")}, {first.differing} of {first.numel} '
                  f'elements, at most {first.max_steps:.0f} step(s); a few one-step differences are values on a '
                  f'rounding boundary under a different float summation order, and later layers inherit them')
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Export; a user-fixable problem raises ``SystemExit('error: <message>')`` (exit status 1)."""
    args = parse_args(argv)
    from qdrop_mm.openmmlab.settings import PTQError
    try:
        check_args(args)
        return export(args)
    except (ValueError, ImportError, PTQError) as err:
        raise SystemExit(f'error: {err}') from None


if __name__ == '__main__':
    main()
