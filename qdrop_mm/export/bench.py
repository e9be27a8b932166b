"""Time exported graphs in onnxruntime's CPU provider and see which nodes ran as integer kernels.

onnxruntime rewrites a QDQ graph when it builds a session (ORT_ENABLE_ALL): a
DequantizeLinear → Conv → QuantizeLinear group becomes one QLinearConv (UINT8
activations, INT8 weights, int32 accumulation) where its patterns match; the
rest runs in FP32 on dequantized values. :func:`optimized_op_counts` saves that
rewritten graph (``SessionOptions.optimized_model_filepath``) and counts its
nodes, :func:`integer_kernel_count` the integer ones.

The command line (``tools/bench_onnx.py`` is its shim)::

    python tools/bench_onnx.py --graph fp32=fp32.onnx --graph w8a8=w8a8.onnx --graph w4a4=w4a4.onnx
        [--input-shape 1 3 H W] [--threads 1 2] [--runs 20] [--warmup 3] [--baseline fp32] [--json out.json]

prints a markdown table: latency per image (median and min over --runs), file size, how many nodes of
onnxruntime's optimized graph compute on integers (QLinearConv, ...) and how many convs stay FP32. Bad
input prints ``error: <message>`` and exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .onnx_io import MethodForward, export_onnx, onnxruntime_session, qdq_node_counts
from .parity import random_input

# onnxruntime ops that compute on integers (contrib ops included)
INTEGER_OPS = ('QLinearConv', 'ConvInteger', 'QLinearMatMul', 'MatMulInteger', 'MatMulIntegerToFloat', 'QGemm',
               'QLinearAdd', 'QLinearMul', 'QLinearConcat', 'QLinearAveragePool', 'QLinearGlobalAveragePool',
               'QLinearSigmoid', 'QLinearLeakyRelu', 'QLinearSoftmax', 'QLinearWhere', 'DynamicQuantizeMatMul',
               'QLinearReduceMean', 'QLinearConvTranspose')
FLOAT_CONV_OPS = ('Conv', 'FusedConv', 'ConvTranspose', 'Gemm', 'MatMul', 'FusedMatMul')


def optimized_op_counts(path: str) -> Dict[str, int]:
    """Node count per op type of the graph onnxruntime runs for ``path`` (default session, CPU provider)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'optimized.onnx')
        onnxruntime_session(path, log_severity_level=3, optimized_model_filepath=out)
        return qdq_node_counts(out)


def integer_kernel_count(counts: Dict[str, int]) -> int:
    """Number of nodes that compute on integers (:data:`INTEGER_OPS`) in op counts."""
    return sum(n for op, n in counts.items() if op in INTEGER_OPS)


def float_conv_count(counts: Dict[str, int]) -> int:
    """Number of FP32 conv/matmul nodes (:data:`FLOAT_CONV_OPS`) in op counts."""
    return sum(n for op, n in counts.items() if op in FLOAT_CONV_OPS)


def time_session(path: str, shape: Sequence[int], threads: int, runs: int = 20, warmup: int = 3) -> List[float]:
    """Seconds per run of the graph at ``path`` on a seeded N(0, 1) input of ``shape`` (default session)."""
    if runs < 1 or warmup < 0 or threads < 1:
        raise ValueError(f'runs and threads must be >= 1 and warmup >= 0, got {runs}, {threads}, {warmup}')
    session = onnxruntime_session(path, threads=threads, log_severity_level=3)
    x = np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return times


@dataclass
class BenchRow:
    """One graph at one thread count."""

    name: str
    path: str
    threads: int
    batch: int
    median_ms_per_image: float
    min_ms_per_image: float
    file_mb: float
    integer_nodes: int
    float_convs: int
    op_counts: Dict[str, int] = field(default_factory=dict)


def bench_graphs(graphs: Dict[str, str], shape: Sequence[int], threads: Sequence[int] = (1, 2), runs: int = 20,
                 warmup: int = 3) -> List[BenchRow]:
    """Time every graph ({name: path}) at every thread count; ``shape`` is the input (N C H W)."""
    rows = []
    for name, path in graphs.items():
        if not os.path.isfile(path):
            raise ValueError(f'graph {name}: file not found: {path}')
        counts = optimized_op_counts(path)
        size = os.path.getsize(path) / 2 ** 20
        for t in threads:
            times = time_session(path, shape, t, runs, warmup)
            per_image = 1000.0 / shape[0]
            rows.append(BenchRow(name, path, t, shape[0], statistics.median(times) * per_image,
                                 min(times) * per_image, size, integer_kernel_count(counts),
                                 float_conv_count(counts), counts))
    return rows


def format_table(rows: Sequence[BenchRow], baseline: Optional[str] = None) -> str:
    """Markdown table; ``baseline`` names the graph the speedup column divides by (same thread count)."""
    base = {r.threads: r.median_ms_per_image for r in rows if r.name == baseline}
    lines = ['| graph | threads | ms/image (median) | ms/image (min) | speedup | file MB | integer nodes | '
             'FP32 conv/gemm nodes |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        speedup = f'{base[r.threads] / r.median_ms_per_image:.2f}x' if r.threads in base else '-'
        lines.append(f'| {r.name} | {r.threads} | {r.median_ms_per_image:.1f} | {r.min_ms_per_image:.1f} | {speedup} | '
                     f'{r.file_mb:.2f} | {r.integer_nodes} | {r.float_convs} |')
    return '\n'.join(lines)


def write_json(rows: Sequence[BenchRow], path: str, meta: Optional[dict] = None) -> None:
    """Rows (and ``meta``: machine, command, ...) as JSON."""
    with open(path, 'w') as f:
        json.dump({'meta': meta or {}, 'rows': [asdict(r) for r in rows]}, f, indent=1)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
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


def graphs_from_args(items: Sequence[str]) -> Dict[str, str]:
    """{name: path} of the ``--graph NAME=PATH`` arguments."""
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
        if not os.path.isfile(path):
            raise ValueError(f'--fp32-from: {what} not found: {path}')
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model).eval()
    load_checkpoint(model, checkpoint, map_location='cpu', logger='silent')
    export_onnx(MethodForward(model, 'extract_feat'), random_input(shape), out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> List[BenchRow]:
    """The command line (module docstring); returns the rows. Bad input raises ``SystemExit('error: ...')``."""
    args = parse_args(argv)
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
