"""tools/sensitivity.py end to end on coco128 (tiny Faster R-CNN R18-FPN, random weights, RTN W4A4).

Every unit listed once with a positive feature error, all units quantized worse than any one of them,
the suggested ``ptq.overrides`` naming the top-k units and changing exactly their bits, the ready
mixed-precision config, ``--metric`` (evaluator per unit) on a small scope, and the one-line errors.
"""
import json

import pytest

from qdrop_mm.core import QuantLayer, act_quantizers, weight_quantizers
from qdrop_mm.openmmlab import PTQSettings
from qdrop_mm.openmmlab.block_plan import plan_model
from qdrop_mm.openmmlab.sensitivity import (MIXED_PRECISION_CONFIG, SENSITIVITY_JSON, rank_rows, split_batches,
                                            suggest_overrides)

from .conftest import build_model_from_config
from .test_report_plots import MINMAX, PNG_SIGNATURE, fp_checkpoint  # noqa: F401  (fixture)
from .test_resume import CONFIG, data_options

KEEP = 3




@pytest.fixture(scope='module')
def analysis(tmp_path_factory, fp_checkpoint, coco128):
    from tools.sensitivity import main
    work = tmp_path_factory.mktemp('sens') / 'work'
    returned = main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(work), '--eval-images', '2',
                     '--keep-8bit', str(KEEP), '--cfg-options', *data_options(coco128), 'ptq.num_images=2'])
    return work, json.loads((work / SENSITIVITY_JSON).read_text()), returned


def _planned_units(settings_cfg):
    _, model = build_model_from_config(CONFIG)
    plan = plan_model(model, PTQSettings.from_cfg({**MINMAX, **settings_cfg}))
    return {u.name: u.module for u in plan.units}


def _bits(module):
    return sorted({q.bits for q in weight_quantizers(module)}), sorted({q.bits for q in act_quantizers(module)})


def test_every_unit_once_with_a_positive_error_ranked(analysis):
    work, report, returned = analysis
    names = [r['name'] for r in report['units']]
    assert sorted(names) == sorted(_planned_units({})) and len(names) == len(set(names)) == 17
    errors = [r['rel_error'] for r in report['units']]
    assert all(e > 0 for e in errors) and errors == sorted(errors, reverse=True)
    assert [r['rank'] for r in report['units']] == list(range(1, 18))
    assert report['num_eval_images'] == 2 and report['num_calibration_images'] == 2
    assert returned['units'] == report['units']
    png = (work / 'sensitivity.png').read_bytes()
    assert report['plots'] == ['sensitivity.png'] and png[:8] == PNG_SIGNATURE and len(png) > 10_000


def test_all_units_quantized_err_more_than_any_single_unit(analysis):
    _, report, _ = analysis
    assert report['all_units']['rel_error'] > max(r['rel_error'] for r in report['units'])


def test_suggestion_names_the_top_k_units_and_changes_exactly_their_bits(analysis):
    _, report, _ = analysis
    top = [r['name'] for r in report['units']][:KEEP]  # W4A4 everywhere but the stem's weights: none excluded
    assert list(report['suggested_overrides']) == top
    assert all(v == {'w_bits': 8, 'a_bits': 8} for v in report['suggested_overrides'].values())
    base, mixed = _planned_units({}), _planned_units({'overrides': report['suggested_overrides']})
    changed = {n for n in base if _bits(base[n]) != _bits(mixed[n])}
    assert changed == set(top) - {n for n in top if _bits(base[n]) == ([8], [8])}
    assert all(_bits(mixed[n])[0] == [8] and _bits(mixed[n])[1] in ([8], []) for n in top)


def test_suggested_average_bits_follow_the_weight_counts(analysis):
    _, report, _ = analysis
    units = _planned_units({})
    counts = {n: sum(m.weight.numel() for m in u.modules() if isinstance(m, QuantLayer)) for n, u in units.items()}
    total = sum(counts.values())
    gain = sum(counts[n] * (8 - _bits(units[n])[0][0]) for n in report['suggested_overrides'])
    before = report['bits']['avg_w_bits_weighted_by_num_weights']
    assert report['bits_with_suggestion']['avg_w_bits_weighted_by_num_weights'] == pytest.approx(
        before + gain / total)


def test_mixed_precision_config_is_ready_to_run(analysis, fp_checkpoint):
    from mmengine.config import Config
    work, report, _ = analysis
    assert report['mixed_precision_config'] == str(work / MIXED_PRECISION_CONFIG)
    cfg = Config.fromfile(report['mixed_precision_config'])
    settings = PTQSettings.from_cfg(cfg.ptq)
    assert settings.to_dict()['overrides'] == report['suggested_overrides']
    assert settings.num_images == 2 and cfg.load_from == fp_checkpoint and cfg.model.backbone.depth == 18


def test_ranking_and_suggestion_rules():
    rows = [{'name': 'a', 'rel_error': 0.1, 'w_bits': [8], 'a_bits': [8]},
            {'name': 'b', 'rel_error': 0.3, 'w_bits': [4], 'a_bits': [4], 'metric_drop': 0.0},
            {'name': 'c', 'rel_error': 0.2, 'w_bits': [4], 'a_bits': [4], 'metric_drop': 0.5},
            {'name': 'd', 'rel_error': 0.05, 'w_bits': [4], 'a_bits': []}]
    ranked = rank_rows(rows)
    assert [r['name'] for r in ranked] == ['c', 'b', 'a', 'd']  # metric drop first, then feature error
    assert list(suggest_overrides(ranked, 3)) == ['c', 'b', 'd']  # 'a' is 8-bit already
    first, rest = split_batches([{'inputs': [1, 2], 'x': ['p', 'q']}, {'inputs': [3, 4], 'x': ['r', 's']}], 3)
    assert first == [{'inputs': [1, 2], 'x': ['p', 'q']}, {'inputs': [3], 'x': ['r']}]
    assert rest == [{'inputs': [4], 'x': ['s']}]


def test_metric_mode_evaluates_every_unit(fp_checkpoint, coco128, tmp_path):
    from tools.sensitivity import main
    report = main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path), '--eval-images', '1',
                   '--keep-8bit', '1', '--metric', '--cfg-options', *data_options(coco128), 'ptq.num_images=2',
                   'ptq.scope=[neck.lateral_convs]', 'test_dataloader.dataset.indices=1'])
    assert report['metric'] == 'coco/bbox_mAP'
    assert [r['name'] for r in report['units']] and len(report['units']) == 4
    fp = report['fp']['metric']
    for r in report['units']:
        assert r['metric_drop'] == pytest.approx(fp - r['metric'])
    keys = [(r['metric_drop'], r['rel_error']) for r in report['units']]
    assert keys == sorted(keys, reverse=True)
    assert 'coco/bbox_mAP' in report['all_units']['metrics']


@pytest.mark.parametrize('args,message', [
    (['missing.py'], 'error: config file not found: missing.py'),
    ([CONFIG, '--checkpoint', 'nowhere.pth'], 'error: --checkpoint / load_from: checkpoint not found: nowhere.pth'),
])
def test_one_line_errors(args, message):
    from tools.sensitivity import main
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert str(exc.value).startswith(message)


def test_too_few_images_names_the_held_out_ones(fp_checkpoint, coco128, tmp_path):
    from tools.sensitivity import main
    with pytest.raises(SystemExit) as exc:
        main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path), '--eval-images', '1000',
              '--cfg-options', *data_options(coco128)])
    assert str(exc.value).startswith('error: ptq.num_images=1004') and '--eval-images 1000 held-out' in str(exc.value)



def test_a_scope_entry_that_matches_no_module_is_a_one_line_error(fp_checkpoint, coco128, tmp_path):
    from tools.sensitivity import main
    with pytest.raises(SystemExit) as exc:
        main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path), '--cfg-options',
              *data_options(coco128), 'ptq.num_images=2', 'ptq.scope=[bakbone]'])
    assert str(exc.value).startswith("error: ptq.scope entry 'bakbone' matches no module of FasterRCNN")

@pytest.mark.parametrize('method', ['qdrop', 'pdquant'])  # the analysis is RTN: PD-Quant's limit on heads is moot
def test_heads_in_scope_are_measured_through_the_model_forward(fp_checkpoint, coco128, tmp_path, method):
    from tools.sensitivity import main
    report = main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path), '--eval-images', '1',
                   '--cfg-options', *data_options(coco128), 'ptq.num_images=2', f'ptq.method={method}',
                   "ptq.scope=['neck.fpn_convs','rpn_head']"])
    names = [r['name'] for r in report['units']]
    assert len(names) == 4 + 3 and sum(n.startswith('rpn_head.') for n in names) == 3  # rpn_conv, rpn_cls, rpn_reg
    # a two-stage detector's raw outputs are the RoI head's, on the proposals of that run: the RPN units
    # move them; an FPN level no proposal of the held-out image maps to may leave them exactly unchanged
    assert all(r['rel_error'] > 0 for r in report['units'] if r['name'].startswith('rpn_head.'))
    assert all(r['rel_error'] >= 0 for r in report['units']) and report['all_units']['rel_error'] > 0
    assert 'raw head outputs' in report['measure']


def test_roi_head_in_scope_is_measured_on_the_fp_proposals(fp_checkpoint, coco128, tmp_path):
    from tools.sensitivity import main
    report = main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path), '--eval-images', '1',
                   '--cfg-options', *data_options(coco128), 'ptq.num_images=2', "ptq.scope=['rpn_head','roi_head']"])
    rows = {r['name']: r['rel_error'] for r in report['units']}
    assert sorted(rows) == ['roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg', 'roi_head.bbox_head.shared_fcs.0',
                            'roi_head.bbox_head.shared_fcs.1', 'rpn_head.rpn_cls', 'rpn_head.rpn_conv', 'rpn_head.rpn_reg']
    # outputs: the RPN's raw outputs and the RoI head's on the FP proposals: every unit moves them
    assert all(err > 0 for err in rows.values()) and report['all_units']['rel_error'] > 0


def test_activation_parts_with_the_metric(fp_checkpoint, coco128, tmp_path):
    from tools.sensitivity import main
    report = main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path), '--eval-images', '1',
                   '--keep-8bit', '1', '--metric', '--parts', 'activations', '--cfg-options', *data_options(coco128),
                   'ptq.num_images=2', 'ptq.scope=[neck.lateral_convs]', 'test_dataloader.dataset.indices=1'])
    rows = report['units']
    assert report['part'] == 'activation quantizer' and 'weights FP' in report['measure']
    assert sorted(r['name'] for r in rows) == [f'neck.lateral_convs.{i}.act_quantizer' for i in range(4)]
    assert all(r['unit'] == r['name'].rsplit('.', 1)[0] and r['w_bits'] == [] and r['a_bits'] == [4]
               and r['num_weights'] == 0 and r['rel_error'] > 0 for r in rows)
    assert all(r['metric_drop'] == pytest.approx(report['fp']['metric'] - r['metric']) for r in rows)
    assert list(report['suggested_overrides']) == [rows[0]['unit']]  # the unit of the costliest activation


def test_a_saved_quantized_model_is_analysed_with_its_own_settings(fp_checkpoint, coco128, tmp_path):
    from tools.ptq import main as ptq_main
    from tools.sensitivity import main
    options = [*data_options(coco128), 'ptq.num_images=2', 'ptq.scope=[neck.lateral_convs]']
    ptq_main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path / 'ptq'), '--cfg-options', *options,
              'ptq.method=rtn', 'ptq.w_bits=2', 'test_dataloader.dataset.indices=1'])
    saved = str(tmp_path / 'ptq' / 'quantized.pth')
    report = main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path / 'sens'), '--eval-images', '1',
                   '--quantized', saved, '--cfg-options', *options[:-1], 'ptq.scope=[backbone]'])
    assert report['quantized'] == f'loaded from {saved}' and report['settings']['w_bits'] == 2
    assert sorted(r['name'] for r in report['units']) == [f'neck.lateral_convs.{i}' for i in range(4)]
    assert all(r['w_bits'] == [2] and r['rel_error'] > 0 for r in report['units'])
    with pytest.raises(SystemExit, match='^error: --quantized file not found: nowhere.pth'):
        main([CONFIG, '--checkpoint', fp_checkpoint, '--work-dir', str(tmp_path / 's2'), '--quantized', 'nowhere.pth',
              '--cfg-options', *options])
