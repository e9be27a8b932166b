"""Time exported ONNX graphs in onnxruntime (CPU provider, default session) and count integer kernels.

    python tools/bench_onnx.py --graph fp32=fp32.onnx --graph w8a8=w8a8.onnx --graph w4a4=w4a4.onnx
        [--input-shape 1 3 H W] [--threads 1 2] [--runs 20] [--warmup 3] [--baseline fp32] [--json out.json]

Prints a markdown table: latency per image (median and min over --runs), file size, how many nodes of
onnxruntime's optimized graph compute on integers (QLinearConv, ...) and how many convs stay FP32.
Logic in qdrop_mm/export/bench.py. Bad input prints ``error: <message>`` and exits with status 1.
"""
from __future__ import annotations

import argparse
import os.path as osp
import platform
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Benchmark ONNX graphs in onnxruntime CPU')
    p.add_argument('--graph', action='append', default=[], metavar='NAME=PATH', help='a graph to time (repeat)')
    p.add_argument('--fp32-from', nargs=3, metavar=('CONFIG', 'CHECKPOINT', 'OUT'),
                   help='first export the FP model\'s extract_feat (backbone + neck) to OUT and time it as "fp32"')
    p.add_argument('--input-shape', type=int, nargs=4, default=[1, 3, 800, 1344], metavar=('N', 'C', 'H', 'W'))
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2], help='intra-op thread counts (default 1 2)')
    p.add_argument('--runs', type=int, default=20, help='timed runs per graph and thread count (default 20)')
    p.add_argument('--warmup', type=int, default=3, help='untimed runs first (default 3)')
    p.add_argument('--baseline', help='graph name the speedup column divides by (default: the first)')
    p.add_argument('--json', metavar='FILE', help='also write the rows as JSON')
    return p.parse_args(argv)


def graphs_from_args(items: Sequence[str]) -> dict:
    graphs = {}
    for item in items:
        name, sep, path = item.partition('=')
        if not sep or not name or not path:
            raise ValueError(f'--graph must be NAME=PATH, got {item!r}')
        if name in graphs:
            raise ValueError(f'--graph name {name!r} given twice')
        graphs[name] = path
    return graphs


def export_fp32(config: str, checkpoint: str, out: str, shape: Sequence[int]) -> str:
    """The FP model's extract_feat as ONNX at ``out`` (same input convention as tools/export_onnx.py)."""
    for path, what in ((config, 'config'), (checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise ValueError(f'--fp32-from: {what} not found: {path}')
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint
    from qdrop_mm.export import MethodForward, export_onnx, random_input
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model).eval()
    load_checkpoint(model, checkpoint, map_location='cpu', logger='silent')
    export_onnx(MethodForward(model, 'extract_feat'), random_input(shape), out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> List:
    args = parse_args(argv)
    from qdrop_mm.export.bench import bench_graphs, format_table, write_json
    try:
        graphs = graphs_from_args(args.graph)
        if args.fp32_from:
            graphs = {'fp32': export_fp32(*args.fp32_from, args.input_shape), **graphs}
        if not graphs:
            raise ValueError('no graphs: give --graph NAME=PATH and/or --fp32-from')
        if min(args.input_shape) < 1:
            raise ValueError(f'--input-shape must be positive, got {args.input_shape}')
        baseline = args.baseline or next(iter(graphs))
        if baseline not in graphs:
            raise ValueError(f'--baseline {baseline!r} is not one of the graphs {list(graphs)}')
        rows = bench_graphs(graphs, args.input_shape, args.threads, args.runs, args.warmup)
    except ValueError as err:
        raise SystemExit(f'error: {err}') from None
    print(format_table(rows, baseline))
    if args.json:
        import onnxruntime
        write_json(rows, args.json, {'command': ' '.join(sys.argv), 'input_shape': args.input_shape,
                                     'machine': platform.processor() or platform.machine(),
                                     'onnxruntime': onnxruntime.__version__, 'baseline': baseline})
        print(f'wrote {args.json}')
    return rows


if __name__ == '__main__':
    main()
