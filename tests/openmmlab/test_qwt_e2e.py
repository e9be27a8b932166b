"""QwT end to end through tools/ptq.py on coco128: ``ptq.method=qdrop_qwt`` on the tiny Faster R-CNN R18-FPN
(random weights): the compensation pass after the QDrop stage, the saved 1x1 convs, their effect on the
features, and ``--load-quantized`` rebuilding them to the same metrics."""
import dataclasses
import json

import pytest
import torch

from qdrop_mm.core import Compensated, output_mse, quant_state
from qdrop_mm.openmmlab import PTQSettings
from qdrop_mm.openmmlab.block_plan import plan_model
from qdrop_mm.openmmlab.calibration import build_calibration_batches, feature_forward

from .conftest import build_model_from_config, save_random_checkpoint
from .test_resume import CONFIG, assert_bit_identical, data_options, quantized_state

METHOD = ['ptq.method=qdrop_qwt']


@pytest.mark.parametrize('method,stages', [('qwt', 0), ('qdrop_qwt', 1)])
def test_settings_accept_the_qwt_methods(method, stages):
    built = PTQSettings.from_cfg({'method': method, 'iters': 7}).build_method()
    assert len(built.stages) == stages and [s.iters for s in built.stages] == [7] * stages
    assert (built.compensation.ridge, built.compensation.placement, built.compensation.validate) == \
        (1e-4, 'before_quantizer', True)


def test_plan_wraps_every_unit_and_moves_output_quantizers():
    _, model = build_model_from_config(CONFIG)
    plan = plan_model(model, PTQSettings.from_cfg({'method': 'qwt'}))
    assert plan.units and all(isinstance(u.module, Compensated) for u in plan.units)
    block = model.backbone.layer2[0]
    assert block is plan.units[[u.name for u in plan.units].index('backbone.layer2.0')].module
    assert block.out_quantizer is not None and block.unit.act_quantizer is None and block.compensation is None
    assert model.neck.fpn_convs[0].out_quantizer is None  # FPN outputs stay FP: nothing to move


@pytest.fixture(scope='module')
def qwt_run(tmp_path_factory, coco128):
    from tools.ptq import main
    tmp = tmp_path_factory.mktemp('qwt')
    ckpt = save_random_checkpoint(CONFIG, str(tmp / 'fp.pth'))
    work = tmp / 'work'
    metrics = main([CONFIG, '--checkpoint', ckpt, '--work-dir', str(work),
                    '--cfg-options', *data_options(coco128), *METHOD])
    return work, metrics, ckpt


def test_compensation_pass_follows_the_stage(qwt_run):
    work, metrics, _ = qwt_run
    report = json.loads((work / 'ptq_report.json').read_text())
    names = [u['name'] for u in report['plan']]
    assert [u['name'] for u in report['units'] if u['stage'] == 0] == names
    compensated = [u for u in report['units'] if u['stage'] == 1]
    assert [u['name'] for u in compensated] == names
    assert all(u['iters'] == 0 and u['loss_after'] <= u['loss_before'] for u in compensated)
    assert sum(u['loss_after'] < u['loss_before'] for u in compensated) >= len(names) - 4
    assert report['method']['compensation']['placement'] == 'before_quantizer'
    assert 'coco/bbox_mAP' in metrics


def test_saved_model_holds_one_strided_conv_per_unit(qwt_run):
    work, _, _ = qwt_run
    saved = torch.load(work / 'quantized.pth', weights_only=True)
    state = saved['state_dict']
    suffix = '.compensation.weight'
    shapes = {k[:-len(suffix)]: tuple(v.shape) for k, v in state.items() if k.endswith(suffix)}
    report = json.loads((work / 'ptq_report.json').read_text())
    fitted = [u['name'] for u in report['units'] if u['stage'] == 1 and u['loss_after'] < u['loss_before']]
    assert sorted(shapes) == sorted(fitted) and set(fitted) <= set(saved['meta']['units'])
    assert shapes['backbone.layer2.0'] == (128, 64, 1, 1) and shapes['neck.lateral_convs.0'] == (256, 64, 1, 1)
    assert state['backbone.layer2.0.compensation_stride'].tolist() == [2, 2]
    assert state['backbone.layer1.0.compensation_stride'].tolist() == [1, 1]


def test_compensation_lowers_the_feature_error(qwt_run, coco128):
    work, _, _ = qwt_run
    saved = torch.load(work / 'quantized.pth', weights_only=True)
    cfg, model = build_model_from_config(CONFIG, {'train_dataloader.dataset.data_root': f'{coco128}/'})
    settings = PTQSettings.from_cfg(saved['meta']['ptq'])
    plan_model(model, settings)
    model.load_state_dict(saved['state_dict'], strict=True)
    batch = build_calibration_batches(cfg, dataclasses.replace(settings, seed=123, num_images=2))[0]  # other images
    wrappers = [m for m in model.modules() if isinstance(m, Compensated)]
    assert len(wrappers) == len(saved['meta']['units']) and any(w.compensation is not None for w in wrappers)
    with torch.no_grad():
        with quant_state(model, weight=False, act=False):
            fp = feature_forward(model, batch)
        compensated = feature_forward(model, batch)
        convs = [w.compensation for w in wrappers]
        for w in wrappers:
            w.compensation = None
        plain = feature_forward(model, batch)
        for w, c in zip(wrappers, convs):
            w.compensation = c
    err_comp = sum(output_mse(q, f).item() for q, f in zip(compensated, fp))
    err_plain = sum(output_mse(q, f).item() for q, f in zip(plain, fp))
    assert err_comp < 0.9 * err_plain, (err_comp, err_plain)


def test_load_quantized_reproduces_metrics(qwt_run, coco128, tmp_path):
    from tools.ptq import main
    work, metrics, _ = qwt_run
    again = main([CONFIG, '--load-quantized', str(work / 'quantized.pth'), '--work-dir', str(tmp_path / 'eval'),
                  '--cfg-options', *data_options(coco128)])
    assert again == metrics


def test_resume_after_a_crash_in_the_compensation_pass(qwt_run, coco128, tmp_path, monkeypatch):
    """The pass is not resumable per unit: --resume restores the finished QDrop units and refits every unit."""
    import qdrop_mm.core.qwt as core_qwt
    from tools.ptq import main
    reference, _, ckpt = qwt_run
    fit, calls = core_qwt.fit_compensation, []

    def crash_at_third_unit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)
    monkeypatch.setattr(core_qwt, 'fit_compensation', crash_at_third_unit)
    work = tmp_path / 'work'
    args = [CONFIG, '--checkpoint', ckpt, '--work-dir', str(work), '--cfg-options', *data_options(coco128), *METHOD]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (work / 'quantized.pth').exists() and len(calls) == 3
    manifest = json.loads((work / 'ptq_resume' / 'manifest.json').read_text())
    assert len(manifest['finished']) == len(json.loads((reference / 'ptq_report.json').read_text())['plan'])
    monkeypatch.setattr(core_qwt, 'fit_compensation', fit)
    main(args[:5] + ['--resume'] + args[5:])
    assert_bit_identical(quantized_state(reference), quantized_state(work))
