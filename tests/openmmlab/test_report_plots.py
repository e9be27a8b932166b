"""Report, plots and bit overrides, end to end through tools/ptq.py on coco128.

The tiny Faster R-CNN R18-FPN of tests/openmmlab/configs (random weights, 2 calibration images,
3 iterations per unit): both PNGs, per-unit rows consistent with what is plotted, average bits
recomputed from the plan, the one-screen summary, and ``ptq.overrides`` changing exactly the named layers.
"""
import json
import math
import struct
import sys

import pytest
import torch

from qdrop_mm.core import LSQActQuantizer, QuantLayer
from qdrop_mm.openmmlab import PTQSettings
from qdrop_mm.openmmlab.block_plan import plan_model
from qdrop_mm.openmmlab.report import format_summary
from qdrop_mm.openmmlab.report_plots import (RECON_CURVES_FILE, UNIT_ERRORS_FILE, curve_series, error_bars,
                                             write_report_plots)

from .conftest import build_model_from_config, save_random_checkpoint
from .test_resume import CONFIG, data_options

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
SMALL = ['ptq.num_images=2', 'ptq.iters=3']  # one calibration batch, 3 iterations per unit
MINMAX = {'w_observer': 'minmax', 'a_observer': 'minmax'}  # as the config: the MSE search takes minutes on CPU


@pytest.fixture(scope='module')
def fp_checkpoint(tmp_path_factory):
    return save_random_checkpoint(CONFIG, str(tmp_path_factory.mktemp('report') / 'fp.pth'))


@pytest.fixture(scope='module')
def qdrop_run(tmp_path_factory, fp_checkpoint, coco128):
    from tools.ptq import main
    work = tmp_path_factory.mktemp('report') / 'work'
    main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(work), '--cfg-options', *data_options(coco128),
          *SMALL])
    return work, json.loads((work / 'ptq_report.json').read_text())


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b'IHDR', path
    return struct.unpack('>II', data[16:24])


def _quant_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def _planned(settings_cfg):
    _, model = build_model_from_config(CONFIG)
    plan_model(model, PTQSettings.from_cfg({**MINMAX, **settings_cfg}))
    return model


def test_both_pngs_are_written_and_drawn(qdrop_run):
    import matplotlib.image
    work, report = qdrop_run
    assert report['plots'] == [RECON_CURVES_FILE, UNIT_ERRORS_FILE]
    for name in report['plots']:
        width, height = _png_size(work / name)
        assert width >= 400 and height >= 300 and (work / name).stat().st_size > 10_000
        pixels = matplotlib.image.imread(str(work / name))
        assert pixels[..., :3].std() > 0.05, f'{name} looks blank'


def test_rows_are_consistent_with_the_plotted_numbers(qdrop_run):
    _, report = qdrop_run
    rows = report['units']
    assert [r['name'] for r in rows] == [u['name'] for u in report['plan']]
    labels, before, after = error_bars(report)
    assert labels == [r['name'] for r in rows]
    assert before == [r['rel_error_before'] for r in rows] and after == [r['rel_error_after'] for r in rows]
    series = curve_series(report)
    assert [s[0] for s in series] == labels
    for (_, its, losses), r in zip(series, rows):
        assert its[-1] == r['iters'] == report['settings']['iters']
        assert all(math.isfinite(v) and v > 0 for v in losses)
        assert math.isfinite(r['loss_after']) and r['loss_after'] >= 0
        assert 0 <= r['rel_error_after'] < math.inf and 0 <= r['rel_error_before'] < math.inf
        # both errors compare against the same FP targets: loss / relative error is the mean target energy
        ratio_before, ratio_after = r['loss_before'] / r['rel_error_before'], r['loss_after'] / r['rel_error_after']
        assert ratio_after == pytest.approx(ratio_before, rel=0.05), r['name']
    assert sum(r['seconds'] for r in rows) <= report['timings']['reconstruction']


def test_average_bits_match_the_plan(qdrop_run):
    _, report = qdrop_run
    model = _planned(report['settings'])
    layers = _quant_layers(model)
    weights = sum(m.weight.numel() for m in layers.values())
    w_avg = sum(m.weight.numel() * m.w_bits for m in layers.values()) / weights
    acts = [m for m in model.modules() if isinstance(m, LSQActQuantizer)]
    bits = report['bits']
    assert bits['avg_w_bits_weighted_by_num_weights'] == pytest.approx(w_avg, abs=1e-4)
    assert bits['avg_a_bits_weighted_by_num_act_quantizers'] == pytest.approx(sum(q.bits for q in acts) / len(acts))
    assert sum(bits['num_weights_per_bits'].values()) == weights == sum(u['num_weights'] for u in report['plan'])
    assert bits['num_weights_per_bits']['8'] == layers['backbone.conv1'].weight.numel()  # the 8-bit first layer
    assert report['units'][0]['w_bits'] == [8] and all(r['w_bits'] == [4] for r in report['units'][1:])


def test_summary_fits_one_screen_and_shows_units_and_bits(qdrop_run):
    _, report = qdrop_run
    text = format_summary(report)
    lines = text.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 160
    assert f"weights {report['bits']['avg_w_bits_weighted_by_num_weights']:.3f}" in text
    for r in report['units']:
        row = next(line for line in lines if line.startswith(r['name'] + ' '))
        assert f"{r['loss_after']:.4g}" in row and f"{r['rel_error_after']:.3e}" in row


def test_long_unit_lists_keep_the_worst_units(qdrop_run):
    _, report = qdrop_run
    rows = [dict(report['units'][0], name=f'backbone.unit{i}', rel_error_after=(i * 37 % 60) / 100)
            for i in range(60)]
    text = format_summary(dict(report, units=rows), max_rows=10)
    shown = [line.split()[0] for line in text.splitlines() if line.startswith('backbone.unit')]
    worst = sorted(rows, key=lambda r: r['rel_error_after'], reverse=True)[:10]
    assert shown == [r['name'] for r in rows if r in worst]  # the 10 worst, in network order
    assert '50 more rows not shown' in text and len(text.splitlines()) <= 25


def test_missing_matplotlib_skips_plots_with_a_warning(qdrop_run, tmp_path, monkeypatch):
    _, report = qdrop_run
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    warnings = []
    assert write_report_plots(report, str(tmp_path), warnings.append) == []
    assert len(warnings) == 1 and 'matplotlib' in warnings[0] and not list(tmp_path.iterdir())


def test_override_changes_exactly_the_layers_under_the_prefix():
    base = _quant_layers(_planned({}))
    over = _quant_layers(_planned({'overrides': {'backbone.layer1': dict(w_bits=8)}}))
    assert base.keys() == over.keys()
    changed = {n for n in base if base[n].w_bits != over[n].w_bits}
    under = {n for n in base if n.startswith('backbone.layer1.')}
    assert changed == under and len(under) == 4 and all(over[n].w_bits == 8 for n in under)
    assert all(base[n].w_bits == 4 for n in under)
    a_bits = {n: m.act_quantizer.bits if m.act_quantizer else None for n, m in base.items()}
    assert a_bits == {n: m.act_quantizer.bits if m.act_quantizer else None for n, m in over.items()}


def test_report_average_bits_move_by_the_overridden_weights(qdrop_run, fp_checkpoint, coco128, tmp_path):
    from tools.ptq import main
    _, base = qdrop_run
    override = {'backbone.layer1': dict(w_bits=8)}
    config = tmp_path / 'override.py'
    config.write_text(f'_base_ = [{CONFIG!r}]\nptq = dict(method="rtn", overrides={override!r})\n')
    main([str(config), '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path / 'work'),
          '--cfg-options', *data_options(coco128), *SMALL])
    report = json.loads((tmp_path / 'work' / 'ptq_report.json').read_text())
    assert report['settings']['overrides'] == {'backbone.layer1': {'w_bits': 8, 'a_bits': None}}
    layers = _quant_layers(_planned({}))
    moved = sum(m.weight.numel() for n, m in layers.items() if n.startswith('backbone.layer1.'))
    total = sum(m.weight.numel() for m in layers.values())
    delta = report['bits']['avg_w_bits_weighted_by_num_weights'] - base['bits']['avg_w_bits_weighted_by_num_weights']
    assert delta == pytest.approx(moved * (8 - 4) / total, abs=2e-4) and delta > 0
    assert report['bits']['avg_a_bits_weighted_by_num_act_quantizers'] == \
        base['bits']['avg_a_bits_weighted_by_num_act_quantizers']
    assert [p['w_bits'] for p in report['plan'] if p['name'].startswith('backbone.layer1.')] == [[8], [8]]
    assert [p['w_bits'] for p in report['plan'] if not p['name'].startswith(('backbone.layer1.', 'backbone.conv1'))] \
        == [[4]] * (len(report['plan']) - 3)
