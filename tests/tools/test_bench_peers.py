"""bench_peers' own logic: config translation, BN folding, result aggregation and table (no peer installed)."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from qdrop_mm.benchmarks import peers
from qdrop_mm.benchmarks.peers import (CellSpec, PeerBenchError, failures, fold_batchnorms, markdown_table,
                                       parse_bits, parse_cells, record_run, summarize, text_report, translate)


def _run(tool, method, w, a, seed, m_ap=None, error=None, seconds=10.0, peak=100.0, scope='backbone+neck'):
    return {'tool': tool, 'method': method, 'w_bits': w, 'a_bits': a, 'seed': seed,
            'spec_key': list(CellSpec(tool, method, w, a, seed).key()),
            'metrics': {} if m_ap is None else {'coco/bbox_mAP': m_ap}, 'error': error, 'seconds': seconds,
            'peak_mib': peak, 'scope': None if error else scope, 'notes': []}


def test_no_peer_is_imported_by_the_module():
    code = ('import sys; import qdrop_mm.benchmarks.peers; '
            'print(sorted(m for m in ("aimet_torch", "brevitas", "mqbench") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'


def test_parse_bits_and_cells():
    assert parse_bits('2/4') == (2, 4)
    with pytest.raises(PeerBenchError, match='from 2 to 8'):
        parse_bits('1/4')
    with pytest.raises(PeerBenchError, match='W/A pairs'):
        parse_bits('4')
    assert parse_cells(['aimet']) == [('aimet', 'adaround'), ('aimet', 'seq_mse')]
    assert parse_cells(['mqbench:brecq', 'mqbench']) == [('mqbench', 'brecq'), ('mqbench', 'qdrop')]
    with pytest.raises(PeerBenchError, match='unknown peer method'):
        parse_cells(['aimet:gptq'])


def test_translate_aimet_adaround_budget_bits_and_first_layer():
    s = translate(CellSpec('aimet', 'adaround', 2, 4, seed=1, iters=300, num_images=32, batch_size=2))
    assert (s['default_param_bw'], s['default_output_bw']) == (2, 4)
    assert s['param_bw_override'] == {'backbone.conv1': 8}
    assert s['default_num_iterations'] == 300 and s['num_batches'] == 16 and s['samples_per_iteration'] == 2
    cfg = s['config_file']
    assert cfg['defaults']['params']['is_symmetric'] == 'False'
    assert cfg['defaults']['per_channel_quantization'] == 'True'
    assert cfg['model_input'] == {}  # no input quantizer
    seq = translate(CellSpec('aimet', 'seq_mse', 4, 4, num_images=5, batch_size=2))
    assert seq['num_candidates'] == 20 and seq['num_batches'] == 3 and 'default_num_iterations' not in seq


def test_translate_brevitas_and_mqbench():
    g = translate(CellSpec('brevitas', 'gptq', 4, 4))
    qm = g['quantize_model']
    assert (qm['weight_bit_width'], qm['act_bit_width'], qm['layerwise_first_last_bit_width']) == (4, 4, 8)
    assert qm['backend'] == 'layerwise' and qm['weight_quant_granularity'] == 'per_channel'
    lr = translate(CellSpec('brevitas', 'learned_round', 2, 4, iters=123))
    assert lr['learned_round_iters'] == 123 and lr['learned_round'] == 'hard_sigmoid'
    assert lr['quantize_model']['weight_bit_width'] == 2
    q = translate(CellSpec('mqbench', 'qdrop', 2, 4, iters=300))
    b = translate(CellSpec('mqbench', 'brecq', 2, 4, iters=300))
    assert q['extra_qconfig_dict']['w_qscheme'] == {'bit': 2, 'symmetry': False, 'per_channel': True,
                                                    'pot_scale': False}
    assert q['extra_qconfig_dict']['a_qscheme']['bit'] == 4
    assert (q['reconstruction']['prob'], b['reconstruction']['prob']) == (0.5, 1.0)
    assert q['reconstruction']['max_count'] == 300 and q['first_layer_w_bit'] == 8
    with pytest.raises(PeerBenchError):
        translate(CellSpec('brevitas', 'adaround', 4, 4))


def test_fold_batchnorms_keeps_the_function_and_removes_the_bns(one_thread):
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.down = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
            self.bn_alone = nn.BatchNorm2d(8)  # its input is an add, not a conv: stays

        def forward(self, x):
            return self.bn_alone(torch.relu(self.bn1(self.conv1(x))) + self.down(x))

    net = Block().eval()
    for bn in (net.bn1, net.down[1], net.bn_alone):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    assert fold_batchnorms(net, x) == 2
    assert isinstance(net.bn1, nn.Identity) and isinstance(net.down[1], nn.Identity)
    assert isinstance(net.bn_alone, nn.BatchNorm2d)
    assert net.conv1.bias is not None
    assert torch.allclose(net(x), ref, atol=1e-5)


def test_summarize_mean_std_errors_and_last_run_per_seed():
    runs = [_run('aimet', 'adaround', 4, 4, 0, 0.40), _run('aimet', 'adaround', 4, 4, 1, 0.42, seconds=30.0),
            _run('aimet', 'adaround', 4, 4, 2, 0.44, peak=300.0),
            _run('aimet', 'adaround', 2, 4, 0, error='quantize: RuntimeError: boom'),
            _run('mqbench', 'qdrop', 4, 4, 0, 0.30, scope='backbone')]
    record_run_results = {'runs': list(runs)}
    record_run(record_run_results, _run('aimet', 'adaround', 4, 4, 0, 0.38))  # replaces seed 0
    assert len(record_run_results['runs']) == 5
    s = {(x.tool, x.method, x.w_bits, x.a_bits): x for x in summarize(record_run_results['runs'])}
    a44 = s[('aimet', 'adaround', 4, 4)]
    assert a44.values == [0.38, 0.42, 0.44] and a44.seeds == [0, 1, 2]
    assert a44.mean == pytest.approx(0.41333333)
    assert a44.std == pytest.approx(0.0305505, abs=1e-6)
    assert a44.seconds == pytest.approx(50 / 3) and a44.peak_mib == 300.0
    assert a44.text() == '0.413±0.031 (3)'
    a24 = s[('aimet', 'adaround', 2, 4)]
    assert a24.values == [] and a24.text() == 'failed' and a24.errors == ['quantize: RuntimeError: boom']
    assert s[('mqbench', 'qdrop', 4, 4)].text() == '0.300 (1)'
    assert failures(list(s.values())) == ['aimet adaround W2A4: quantize: RuntimeError: boom']


def test_markdown_table_rows_columns_and_scope():
    runs = [_run('aimet', 'adaround', 4, 4, 0, 0.40), _run('aimet', 'adaround', 4, 4, 1, 0.42),
            _run('aimet', 'adaround', 2, 4, 0, error='x'), _run('mqbench', 'qdrop', 2, 4, 0, 0.25, scope='backbone',
                                                                 seconds=100.0, peak=900.0)]
    lines = markdown_table(summarize(runs)).splitlines()
    assert lines[0] == ('| tool | method | W4A4 bbox_mAP | W2A4 bbox_mAP | seconds per run | peak memory (MiB) '
                        '| quantized |')
    assert lines[2] == '| aimet | adaround | 0.410±0.014 (2) | failed | 10 | 100 | backbone+neck |'
    assert lines[3] == '| mqbench | qdrop | - | 0.250 (1) | 100 | 900 | backbone |'
    report = text_report({'runs': runs})
    assert 'recorded failures:' in report and '- aimet adaround W2A4: x' in report


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, 'tools/bench_peers.py', '--cells', 'nope', '--out',
                          str(tmp_path / 'r.json')], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: unknown peer method 'nope'; known: aimet:adaround, aimet:seq_mse, brevitas:gptq, "
        "brevitas:learned_round, mqbench:qdrop, mqbench:brecq"]


def test_merge_and_table_from_files(tmp_path, capsys):
    a, b, out = tmp_path / 'a.json', tmp_path / 'b.json', tmp_path / 'out.json'
    a.write_text(json.dumps({'runs': [_run('aimet', 'seq_mse', 4, 4, 0, 0.39)], 'commands': ['ca']}))
    b.write_text(json.dumps({'runs': [_run('aimet', 'seq_mse', 4, 4, 0, 0.41), _run('brevitas', 'gptq', 4, 4, 0, 0.2)],
                             'commands': ['cb']}))
    assert peers.main(['--out', str(out), '--merge', str(a), str(b)]) == 0
    merged = json.loads(out.read_text())
    assert [r['metrics']['coco/bbox_mAP'] for r in merged['runs']] == [0.41, 0.2]
    assert merged['commands'] == ['ca', 'cb']
    assert '| aimet | seq_mse | 0.410 (1) |' in capsys.readouterr().out
