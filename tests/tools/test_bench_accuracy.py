"""Merging benchmark results and rendering the table (no models run)."""
import json

from qdrop_mm.benchmarks.accuracy import load_results, main, merge_results, table


def _run(method: str, w: int, a: int, m_ap: float, iters: int = 300, options=(), seed=None) -> dict:
    run = {'model': 'm', 'method': method, 'w_bits': w, 'a_bits': a, 'iters': iters, 'num_images': 32,
           'options': list(options), 'metrics': {'coco/bbox_mAP': m_ap}, 'seconds': 1.0}
    if seed is not None:
        run['seed'] = seed
    return run


def test_merge_adds_only_missing_runs_and_keeps_commands():
    a = {'models': {'m': {'fp': {'coco/bbox_mAP': 0.5}, 'runs': [_run('rtn', 4, 4, 0.3)]}}, 'commands': ['x']}
    b = {'models': {'m': {'fp': {'coco/bbox_mAP': 0.5}, 'runs': [_run('rtn', 4, 4, 0.1), _run('qdrop', 4, 4, 0.4)]},
                    'n': {'fp': {'mIoU': 40.0}, 'runs': [_run('qwt', 2, 4, 30.0)]}}, 'commands': ['y']}
    merge_results(a, b)
    assert [r['metrics']['coco/bbox_mAP'] for r in a['models']['m']['runs']] == [0.3, 0.4]
    assert a['models']['n']['fp'] == {'mIoU': 40.0}
    assert a['commands'] == ['x', 'y']


def test_table_one_row_per_method_options_and_iterations():
    res = {'models': {'m': {'fp': {'coco/bbox_mAP': 0.5}, 'runs': [
        _run('rtn', 4, 4, 0.3), _run('qdrop', 4, 4, 0.4), _run('qdrop', 2, 4, 0.2),
        _run('qdrop', 2, 4, 0.25, iters=2000), _run('qdrop', 2, 4, 0.22, options=['ptq.drop_prob=1.0'])]}}}
    lines = table(res, ['rtn', 'qdrop'], [(4, 4), (2, 4)]).strip().splitlines()
    assert 'FP 0.500' in lines[0]
    rows = {ln[:34].strip(): ln[34:].split() for ln in lines[2:]}
    assert rows == {'rtn': ['0.300', '-'], 'qdrop, 300 it': ['0.400', '0.200'], 'qdrop, 2000 it': ['-', '0.250'],
                    'qdrop[drop_prob=1.0], 300 it': ['-', '0.220']}


def test_no_run_merges_old_single_command_files(tmp_path):
    old = tmp_path / 'old.json'
    old.write_text(json.dumps({'models': {'m': {'fp': {'coco/bbox_mAP': 0.5}, 'runs': [_run('rtn', 4, 4, 0.3)]}},
                               'command': 'python tools/bench_accuracy.py --models m'}))
    out = tmp_path / 'out'
    main(['--no-run', '--merge', str(old), '--methods', 'rtn', '--bits', '4/4', '--sanity-bits', '--out', str(out)])
    merged = load_results(str(out / 'results.json'))
    assert merged['models']['m']['runs'][0]['metrics']['coco/bbox_mAP'] == 0.3
    assert merged['commands'][0] == 'python tools/bench_accuracy.py --models m'
    assert (out / 'accuracy.png').stat().st_size > 0


def test_markdown_table_matches_text_rows():
    from qdrop_mm.benchmarks.accuracy import markdown
    res = {'models': {'seg': {'fp': {'mIoU': 42.5}, 'runs': [
        {**_run('rtn', 4, 4, 0.0), 'metrics': {'mIoU': 41.25}, 'seconds': 12.4},
        {**_run('qdrop', 2, 4, 0.0), 'metrics': {'mIoU': 30.0}}]}}}
    md = markdown(res, ['rtn', 'qdrop'], [(4, 4), (2, 4)]).strip().splitlines()
    assert md[0] == '**seg** (mIoU, FP 42.50; seeds per cell: 1)'
    assert md[2].startswith('| method | W4A4 | W2A4 |')
    assert md[4] == '| rtn | 41.25 | - | 12 |'
    assert md[5].endswith(' | 1 |')
    assert md[5].startswith('| qdrop, 300 it | - | 30.00 |')


def test_runs_of_another_fp_model_are_refused():
    import pytest
    from qdrop_mm.benchmarks.accuracy import check_same_fp_model
    res = {'fp': {'coco/bbox_mAP': 0.382}, 'fp_digest': 'aaa', 'runs': [_run('rtn', 4, 4, 0.3)]}
    check_same_fp_model('m', res, 'aaa', {'coco/bbox_mAP': 0.382}, 'x.json')
    with pytest.raises(SystemExit, match='another FP model'):
        check_same_fp_model('m', res, 'bbb', {'coco/bbox_mAP': 0.382}, 'x.json')
    legacy = {'fp': {'coco/bbox_mAP': 0.382}, 'runs': [_run('rtn', 4, 4, 0.3)]}
    check_same_fp_model('m', legacy, 'bbb', {'coco/bbox_mAP': 0.382}, 'x.json')
    with pytest.raises(SystemExit, match='another FP model'):
        check_same_fp_model('m', legacy, 'bbb', {'coco/bbox_mAP': 0.564}, 'x.json')
    a = {'models': {'m': {'fp': {'coco/bbox_mAP': 0.5}, 'fp_digest': 'aaa', 'runs': [_run('rtn', 4, 4, 0.3)]}}}
    b = {'models': {'m': {'fp': {'coco/bbox_mAP': 0.6}, 'fp_digest': 'bbb', 'runs': [_run('qdrop', 4, 4, 0.4)]}}}
    with pytest.raises(SystemExit, match='another FP model'):
        merge_results(a, b)
    assert len(a['models']['m']['runs']) == 1


def test_seeded_cells_report_mean_std_and_significant_wins():
    from qdrop_mm.benchmarks.accuracy import cell, markdown, significant_pairs
    runs = [_run('rtn', 4, 4, v, seed=s) for s, v in enumerate([0.50, 0.51, 0.52])]
    runs += [_run('qdrop', 4, 4, v, seed=s) for s, v in enumerate([0.54, 0.55, 0.56])]
    runs += [_run('brecq', 4, 4, v, seed=s) for s, v in enumerate([0.50, 0.53, 0.56])]
    runs.append(_run('qdrop', 4, 4, 0.9))  # legacy run without a seed key counts as seed 0 ...
    runs.append(_run('qdrop', 4, 4, 0.54, seed=0))  # ... and the later run of a seed replaces it
    res = {'models': {'m': {'fp': {'coco/bbox_mAP': 0.6}, 'runs': runs}}}
    c = cell(res['models']['m'], 'qdrop, 300 it', (4, 4), 'coco/bbox_mAP')
    assert c.values == [0.54, 0.55, 0.56]
    assert abs(c.mean - 0.55) < 1e-12 and abs(c.std - 0.01) < 1e-12
    pairs = significant_pairs(res['models']['m'], ['rtn', 'qdrop', 'brecq'], [(4, 4)], 'coco/bbox_mAP')
    # qdrop - rtn = 0.04 > 0.01 + 0.01; brecq (std 0.03) is within the spread of both
    assert [(a, b) for _, a, b, _ in pairs] == [('qdrop, 300 it', 'rtn')]
    lines = table(res, ['rtn', 'qdrop', 'brecq'], [(4, 4)]).strip().splitlines()
    assert 'seeds per cell: 3' in lines[0]
    rows = {ln[:34].strip(): ln[34:].split() for ln in lines[2:5]}
    assert rows == {'rtn': ['0.510±0.010'], 'qdrop, 300 it': ['0.550±0.010*'], 'brecq, 300 it': ['0.530±0.030']}
    assert 'W4A4: qdrop, 300 it > rtn by 0.040' in lines[5]
    md = markdown(res, ['rtn', 'qdrop'], [(4, 4)]).strip().splitlines()
    assert md[5].startswith('| qdrop, 300 it | 0.550±0.010* |')


def test_one_seed_never_counts_as_a_win():
    from qdrop_mm.benchmarks.accuracy import significant_pairs
    res = {'fp': {}, 'runs': [_run('rtn', 4, 4, 0.1, seed=0), _run('qdrop', 4, 4, 0.9, seed=0)]}
    assert significant_pairs(res, ['rtn', 'qdrop'], [(4, 4)], 'coco/bbox_mAP') == []


def test_seeds_are_part_of_the_reuse_key():
    from qdrop_mm.benchmarks.accuracy import run_key
    assert run_key(_run('rtn', 4, 4, 0.1)) == run_key(_run('rtn', 4, 4, 0.2, seed=0))
    assert run_key(_run('rtn', 4, 4, 0.1, seed=1)) != run_key(_run('rtn', 4, 4, 0.1, seed=0))


def test_calibration_set_sizes_are_separate_rows_compared_with_their_own_rtn():
    def runs(method, n, values):
        return [{**_run(method, 4, 4, v, seed=s), 'num_images': n} for s, v in enumerate(values)]
    res = {'models': {'m': {'fp': {'coco/bbox_mAP': 0.5}, 'runs': [
        *runs('rtn', 32, [0.30, 0.30, 0.30]), *runs('qdrop', 32, [0.35, 0.35, 0.35]),
        *runs('rtn', 128, [0.40, 0.40, 0.40]), *runs('qdrop', 128, [0.38, 0.38, 0.38])]}}}
    lines = table(res, ['rtn', 'qdrop'], [(4, 4)]).strip().splitlines()
    rows = {ln[:34].strip(): ln[34:].split()[0] for ln in lines[2:] if not ln.startswith('  W')}
    # 128-image QDrop (0.38) beats 32-image RTN but not its own RTN (0.40): no mark
    assert rows == {'rtn': '0.300±0.000', 'rtn, 128 images': '0.400±0.000', 'qdrop, 300 it': '0.350±0.000*',
                    'qdrop, 128 images, 300 it': '0.380±0.000'}


def test_curve_reports_each_budget_as_a_share_of_the_longest_runs_gain(tmp_path):
    from qdrop_mm.benchmarks.accuracy import curve_table, curves
    res = {'models': {'m': {'fp': {'coco/bbox_mAP': 0.5}, 'runs': [
        _run('rtn', 2, 4, 0.2), _run('qdrop', 2, 4, 0.35, iters=300), _run('qdrop', 2, 4, 0.38, iters=2000),
        _run('qdrop', 2, 4, 0.4, iters=20000), _run('brecq', 2, 4, 0.3), _run('qdrop', 4, 4, 0.45)]}}}
    got = curves(res['models']['m'], (2, 4), 'coco/bbox_mAP')
    assert list(got) == ['qdrop'] and [it for it, _ in got['qdrop']] == [300, 2000, 20000]
    lines = curve_table(res, (2, 4)).strip().splitlines()
    assert 'RTN 0.200' in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ['300', '2000', '20000']
    assert [ln.split()[3] for ln in lines[1:]] == ['75', '90', '100']
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'results.json').write_text(json.dumps(res))
    main(['--no-run', '--methods', 'rtn', 'qdrop', '--bits', '2/4', '--sanity-bits', '--out', str(out),
          '--curve', '2/4'])
    assert (out / 'curve.png').stat().st_size > 0


def test_another_val_split_reevaluates_the_saved_reconstruction(tmp_path, monkeypatch):
    import argparse
    import qdrop_mm.api as api
    from qdrop_mm.benchmarks.accuracy import run_one, split_name
    calls = []

    def fake_quantize(config, checkpoint, work_dir, cfg_options):
        calls.append(('quantize', work_dir))
        open(f'{work_dir}/quantized.pth', 'wb').close()
        return api.PTQRun(None, {'coco/bbox_mAP': 0.3}, {}, work_dir, None)

    def fake_load(config, quantized, work_dir, cfg_options):
        calls.append(('load', quantized, config))
        return api.PTQRun(None, {'coco/bbox_mAP': 0.25}, {}, work_dir, None)

    monkeypatch.setattr(api, 'quantize', fake_quantize)
    monkeypatch.setattr(api, 'load_quantized', fake_load)
    args = argparse.Namespace(out=str(tmp_path / 'out'), iters=10, options=[], num_images=4)
    (tmp_path / 'out' / 'm' / 'qdrop_w4a4_10it_seed1').mkdir(parents=True)
    first = run_one('m', 'qdrop', 4, 4, 1, args, 'fp.pth')
    second = run_one(split_name('m', 1000), 'qdrop', 4, 4, 1, args, 'fp.pth', config='split-config')
    other_seed_dir = tmp_path / 'out' / 'm' / 'qdrop_w4a4_10it_seed2'
    other_seed_dir.mkdir()
    third = run_one(split_name('m', 1000), 'qdrop', 4, 4, 2, args, 'fp.pth', config='split-config')
    assert [c[0] for c in calls] == ['quantize', 'load', 'quantize']
    assert calls[1][1].endswith('qdrop_w4a4_10it_seed1/quantized.pth') and calls[1][2] == 'split-config'
    assert (first['metrics'], second['metrics'], third['metrics']) == (
        {'coco/bbox_mAP': 0.3}, {'coco/bbox_mAP': 0.25}, {'coco/bbox_mAP': 0.3})
    assert second['model'] == 'm@val1000' and second['reevaluated'].endswith('quantized.pth')
    assert 'reevaluated' not in first
