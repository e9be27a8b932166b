"""bench_block_mse: method specs with options, seeds per cell."""
import json

import pytest

from qdrop_mm.benchmarks.block_mse import main, parse_method


def test_method_specs_parse_options():
    assert parse_method('qdrop') == ('qdrop', {})
    assert parse_method('qdrop:schedule=budget,w_lr=0.01,learn_bias=True') == \
        ('qdrop', {'schedule': 'budget', 'w_lr': 0.01, 'learn_bias': True})
    with pytest.raises(SystemExit, match='key=value'):
        parse_method('qdrop:budget')


def test_seeded_cells_and_json(tmp_path, one_thread):
    out = tmp_path / 'r.json'
    res = main(['--iters', '20', '--seeds', '2', '--bits', '4/4', '--calib-batches', '2', '--batch-size', '2',
                '--methods', 'rtn', 'qdrop:schedule=budget', '--out', str(out)])
    rows = json.loads(out.read_text())['rows']
    assert [(r['method'], r['seed']) for r in rows] == [('rtn', 0), ('rtn', 1), ('qdrop:schedule=budget', 0),
                                                       ('qdrop:schedule=budget', 1)]
    assert res['seeds'] == [0, 1]
    rtn = {r['seed']: r['held_out_mse'] for r in rows if r['method'] == 'rtn'}
    assert rtn[0] != rtn[1]  # the seed changes network and data
    for r in rows:
        if r['method'] != 'rtn':  # reconstruction lowers the calibration error on each seed's network
            assert r['calib_mse'] < [x for x in rows if x['method'] == 'rtn' and x['seed'] == r['seed']][0]['calib_mse']
    with pytest.raises(SystemExit, match='schedule must be one of'):
        main(['--iters', '2', '--bits', '4/4', '--calib-batches', '1', '--methods', 'qdrop:schedule=fast',
              '--out', str(out)])
