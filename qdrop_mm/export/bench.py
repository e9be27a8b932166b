"""Time exported graphs in onnxruntime's CPU provider and see which nodes ran as integer kernels.

onnxruntime rewrites a QDQ graph when it builds a session (ORT_ENABLE_ALL): a
DequantizeLinear → Conv → QuantizeLinear group becomes one QLinearConv (UINT8
activations, INT8 weights, int32 accumulation) where its patterns match; the
rest runs in FP32 on dequantized values. :func:`optimized_op_counts` saves that
rewritten graph (``SessionOptions.optimized_model_filepath``) and counts its
nodes, :func:`integer_kernel_count` the integer ones.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .onnx_io import onnxruntime_session, qdq_node_counts

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
