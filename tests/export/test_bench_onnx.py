"""qdrop_mm.export.bench and tools/bench_onnx.py on the toy network: integer-kernel counting, table, JSON."""
import copy
import json

import pytest

from qdrop_mm.export import MethodForward, export_onnx, prepare_export
from qdrop_mm.export.bench import (BenchRow, bench_graphs, float_conv_count, format_table, integer_kernel_count,
                                   optimized_op_counts)

pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def toy_graphs(hardened_toy, tmp_path_factory):
    """The hardened ToyNet's features with UINT8 and INT8 activation storage, and its FP32 (unquantized) graph."""
    net, batches = hardened_toy
    folder = tmp_path_factory.mktemp('bench')
    paths = {}
    for storage in ('uint8', 'int8'):
        prepared = prepare_export(copy.deepcopy(net), lambda m: m.features(batches[0]), activation_storage=storage)
        paths[storage] = str(folder / f'{storage}.onnx')
        export_onnx(MethodForward(prepared.module, 'features'), batches[0], paths[storage])
    return paths, batches[0].shape


def test_uint8_activations_run_as_integer_convs(toy_graphs):
    paths, _ = toy_graphs
    u8 = optimized_op_counts(paths['uint8'])
    i8 = optimized_op_counts(paths['int8'])
    # ToyNet: stem (FP input) + per block conv1 (own output quantizer: fusable), conv2 and shortcut (their sum
    # is quantized after the Add: FP32). Block1's conv1 reads the stem output, block2's conv1 block1's output.
    assert u8.get('QLinearConv', 0) == integer_kernel_count(u8) == 2
    assert float_conv_count(u8) == 6 - 2
    # INT8 activations read by two nodes (conv and residual Add) are not converted to UINT8 by onnxruntime on
    # x86, so their convs stay FP32
    assert integer_kernel_count(i8) < integer_kernel_count(u8)
    assert integer_kernel_count({'QLinearConv': 3, 'Conv': 2, 'QLinearAdd': 1}) == 4
    assert float_conv_count({'QLinearConv': 3, 'Conv': 2, 'FusedConv': 1}) == 3


def test_table_and_json(toy_graphs, tmp_path, capsys):
    from tools.bench_onnx import main
    paths, shape = toy_graphs
    out = tmp_path / 'bench.json'
    rows = main(['--graph', f'u8={paths["uint8"]}', '--graph', f'i8={paths["int8"]}', '--input-shape', *map(str, shape),
                 '--threads', '1', '2', '--runs', '2', '--warmup', '0', '--json', str(out)])
    assert [(r.name, r.threads) for r in rows] == [('u8', 1), ('u8', 2), ('i8', 1), ('i8', 2)]
    assert all(r.median_ms_per_image > 0 and r.min_ms_per_image <= r.median_ms_per_image for r in rows)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith('| graph | threads | ms/image (median)')
    assert printed[2].startswith('| u8 | 1 |') and '| 1.00x |' in printed[2] and printed[2].endswith('| 2 | 4 |')
    saved = json.loads(out.read_text())
    assert [r['integer_nodes'] for r in saved['rows']][:2] == [2, 2]
    assert saved['meta']['input_shape'] == list(shape) and saved['meta']['baseline'] == 'u8'


def test_speedup_column_divides_by_the_baseline():
    rows = [BenchRow('fp32', 'a', 1, 1, 10.0, 9.0, 4.0, 0, 5), BenchRow('q', 'b', 1, 1, 4.0, 3.0, 1.0, 3, 2),
            BenchRow('q', 'b', 2, 1, 3.0, 2.0, 1.0, 3, 2)]
    lines = format_table(rows, 'fp32').splitlines()
    assert '| 2.50x |' in lines[3] and '| - |' in lines[4]


@pytest.mark.parametrize('args,message', [
    (['--graph', 'nope'], '--graph must be NAME=PATH'),
    (['--graph', 'a=missing.onnx'], 'graph a: file not found: missing.onnx'),
    (['--graph', 'a=x.onnx', '--graph', 'a=y.onnx'], "--graph name 'a' given twice"),
    (['--graph', 'a=x.onnx', '--baseline', 'b'], "--baseline 'b' is not one of the graphs"),
])
def test_bad_arguments_stop_with_one_line(args, message):
    from tools.bench_onnx import main
    with pytest.raises(SystemExit, match='^error: ' + message):
        main(args)


def test_bench_graphs_refuses_bad_counts(toy_graphs):
    paths, shape = toy_graphs
    with pytest.raises(ValueError, match='runs and threads must be >= 1'):
        bench_graphs({'u8': paths['uint8']}, shape, threads=[1], runs=0)
