"""PD-Quant through the OpenMMLab glue: the prediction tails of Faster R-CNN (RPN + RoI head), RetinaNet and a
segmentor, ``ptq.method=pdquant`` end to end through tools/ptq.py (tiny Faster R-CNN R18-FPN on coco128, tiny
DeepLabV3 R18 on generated shapes; random weights), its report and ``--load-quantized``."""
import json
import math

import pytest
import torch
from mmdet.structures import DetDataSample

from qdrop_mm.core import PredictionTerm, build_method, calibrate_activations, quant_state
from qdrop_mm.core.ptq import build_unit_cache
from qdrop_mm.demo.shapes_dataset import generate_shapes_dataset
from qdrop_mm.openmmlab import PTQSettings
from qdrop_mm.openmmlab.block_plan import plan_model
from qdrop_mm.openmmlab.calibration import feature_forward
from qdrop_mm.openmmlab.prediction_tail import PREDICTION_SOURCE, UnsupportedHeadError, select_predict_fn
from qdrop_mm.openmmlab.settings import PTQConfigError

from .conftest import REPO, build_model_from_config, save_random_checkpoint
from .test_resume import CONFIG, data_options, quantized_state

SEG_CONFIG = f'{REPO}/tests/openmmlab/configs/deeplabv3_r50_shapes_tiny.py'
SEG_R18 = {'model.backbone.depth': 18, 'model.decode_head.in_channels': 512, 'model.decode_head.channels': 32,
           'model.auxiliary_head.in_channels': 256, 'model.auxiliary_head.channels': 32}
RETINANET = {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512]}
# 4 iterations per unit (the tiny config), PD term every iteration, 3 DC steps per batch
PDQUANT = ['ptq.method=pdquant', 'ptq.method_options.dc_iters=3', "ptq.scope=['backbone']"]


pytestmark = pytest.mark.usefixtures('one_thread')


def test_settings_validate_the_pdquant_options():
    method = PTQSettings.from_cfg({'method': 'pdquant', 'iters': 7,
                                   'method_options': {'pd_weight': 2.5, 'dc_iters': 0}}).build_method()
    assert method.name == 'pdquant' and method.stages[0].iters == 7 and method.stages[0].drop_prob == 0.5
    assert (method.prediction.pd_weight, method.prediction.dc_iters, method.prediction.pd_temperature) == (2.5, 0, 4.0)
    for options, message in (({'pd_weight': -1.0}, 'ptq.method_options.pd_weight must be a finite number >= 0'),
                              ({'dc_iters': 2.5}, 'ptq.method_options.dc_iters must be a finite integer'),
                              ({'pd_temperature': 0}, 'ptq.method_options.pd_temperature must be a finite number > 0')):
        with pytest.raises(PTQConfigError, match=f'^{message}'):
            PTQSettings.from_cfg({'method': 'pdquant', 'method_options': options})
    with pytest.raises(PTQConfigError, match="^ptq.method_options.pd_weight only applies to methods with a "
                                             "prediction term \\(pdquant\\), not 'qdrop'"):
        PTQSettings.from_cfg({'method': 'qdrop', 'method_options': {'pd_weight': 1.0}})


def _det_batch(sizes=((64, 80), (64, 72))):
    g = torch.Generator().manual_seed(0)
    samples = [DetDataSample(metainfo=dict(img_shape=s, ori_shape=s, scale_factor=(1.0, 1.0))) for s in sizes]
    return {'inputs': [torch.randint(0, 255, (3, *s), generator=g, dtype=torch.uint8) for s in sizes],
            'data_samples': samples}


@pytest.mark.parametrize('config,options,groups', [
    (CONFIG, None, [('sigmoid', 1, 4), ('softmax', 81, 320)]),  # RPN objectness + RoI head on FP proposals
    (f'{REPO}/configs/retinanet_r50_w4a4.py', RETINANET, [('sigmoid', 80, 4)]),
])
def test_detector_tail_rows_and_zero_difference_when_fp(config, options, groups):
    _, model = build_model_from_config(config, options)
    batch = _det_batch()
    plan = plan_model(model, PTQSettings.from_cfg({'method': 'pdquant', 'scope': ['backbone'],
                                                   'w_observer': 'minmax', 'a_observer': 'minmax'}))
    source = PREDICTION_SOURCE
    with torch.no_grad(), quant_state(model, weight=False, act=False):
        got, context = source.predict_fn(model, batch, None)
    assert [(g.kind, g.scores.shape[1], g.boxes.shape[1]) for g in got] == groups
    anchors, strides = (9, (8, 16, 32, 64, 128)) if len(groups) == 1 else (3, (4, 8, 16, 32, 64))
    height, width = model.data_preprocessor(batch, False)['inputs'].shape[2:]
    positions = sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)
    assert got[0].scores.shape[0] == 2 * anchors * positions
    assert len(context) == (2 if len(groups) == 2 else 0)

    calibrate_activations(model, [batch], feature_forward)
    method = build_method('pdquant', iters=1)
    term = PredictionTerm(model, [(u.name, u.module) for u in plan.units], [batch], source, method.prediction)
    unit = plan.units[3].module
    cache = build_unit_cache(model, unit, [batch], feature_forward, method.stages[0])
    with torch.no_grad():
        with quant_state(model, weight=False, act=False):
            off = term.difference(unit, 0, unit(cache.x_fp.get(0, torch.device('cpu')))).item()
        on = term._tail_difference(unit, 0, unit(cache.x_q.get(0, torch.device('cpu'))), method.stages[0]).item()
    assert abs(off) < 1e-9 and on > 1e-6


def test_unsupported_heads_fail_with_one_line_naming_the_head(coco128, tmp_path, monkeypatch):
    import os.path as osp

    import mmdet
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim/configs/yolox/yolox_tiny_8xb8-300e_coco.py'))
    yolox = MODELS.build(cfg.model)
    with pytest.raises(UnsupportedHeadError, match='^YOLOXHead '):
        select_predict_fn(yolox)

    import qdrop_mm.openmmlab.prediction_tail as prediction_tail
    from tools.ptq import main

    ckpt = save_random_checkpoint(CONFIG, str(tmp_path / 'fp.pth'))
    with pytest.raises(SystemExit) as err:
        main([CONFIG, '--checkpoint', ckpt, '--work-dir', str(tmp_path / 'heads'), '--cfg-options',
              *data_options(coco128), 'ptq.method=pdquant', "ptq.scope=['backbone','rpn_head']"])
    assert str(err.value) == ("error: ptq.method=pdquant: reconstructs backbone and neck units only (its loss runs "
                              "the heads from a unit's output); remove ['rpn_head'] from ptq.scope or use another "
                              "method")

    def refuse(model):
        raise UnsupportedHeadError('FancyHead')
    monkeypatch.setattr(prediction_tail, 'select_predict_fn', refuse)
    with pytest.raises(SystemExit) as err:
        main([CONFIG, '--checkpoint', ckpt, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
              *data_options(coco128), 'ptq.method=pdquant'])
    assert str(err.value) == 'error: ptq.method=pdquant: no prediction tail for FancyHead; use another ptq.method'


@pytest.fixture(scope='module')
def detector_runs(tmp_path_factory, coco128):
    from tools.ptq import main
    tmp = tmp_path_factory.mktemp('pdquant_det')
    ckpt = save_random_checkpoint(CONFIG, str(tmp / 'fp.pth'))
    runs = {}
    for name, extra in (('pdquant', PDQUANT), ('qdrop', ["ptq.scope=['backbone']"])):
        work = tmp / name
        metrics = main([CONFIG, '--checkpoint', ckpt, '--work-dir', str(work), '--cfg-options',
                        *data_options(coco128), *extra])
        runs[name] = (work, metrics, json.loads((work / 'ptq_report.json').read_text()))
    return runs


def test_detector_report_lists_method_and_prediction_loss_per_unit(detector_runs):
    _, _, report = detector_runs['pdquant']
    assert report['method']['name'] == 'pdquant' and report['method']['prediction']['pd_weight'] == 10.0
    rows = {r['name']: r for r in report['prediction_loss']}
    assert list(rows) == [u['name'] for u in report['plan']]
    assert all(r['pd_loss_before'] > 0 and r['pd_loss_after'] > 0 for r in rows.values())
    blocks = [n for n in rows if n.startswith('backbone.layer')]
    assert len(blocks) == 8 and 'dc_mismatch_before' not in rows['backbone.conv1']  # stem BN is a sibling: no DC
    assert all(rows[n]['dc_mismatch_after'] < rows[n]['dc_mismatch_before'] for n in blocks)
    # the PD loss of the last unit is the whole quantized backbone's prediction difference: it grows with depth
    assert rows['backbone.layer4.1']['pd_loss_after'] > rows['backbone.layer1.0']['pd_loss_after']
    assert 'prediction_loss' not in detector_runs['qdrop'][2]


def test_pdquant_gives_other_weights_than_qdrop(detector_runs):
    pd, qd = (quantized_state(detector_runs[m][0]) for m in ('pdquant', 'qdrop'))
    alphas = [k for k in pd if k.endswith('weight_quantizer.alpha')]
    assert alphas and pd.keys() == qd.keys()
    changed = [k for k in alphas if not torch.equal(pd[k], qd[k])]
    assert len(changed) >= len(alphas) // 2, f'{len(changed)}/{len(alphas)} rounding tensors differ'


def test_detector_load_quantized_reproduces_metrics(detector_runs, coco128, tmp_path):
    from tools.ptq import main
    work, metrics, _ = detector_runs['pdquant']
    again = main([CONFIG, '--load-quantized', str(work / 'quantized.pth'), '--work-dir', str(tmp_path / 'eval'),
                  '--cfg-options', *data_options(coco128)])
    assert again == metrics and 'coco/bbox_mAP' in again


def test_segmentor_end_to_end_and_load_quantized(tmp_path):
    from tools.ptq import main
    root = tmp_path / 'shapes'
    generate_shapes_dataset(root, num_train=6, num_val=3, image_size=96, seed=1)
    data = [f'train_dataloader.dataset.data_root={root}/', f'test_dataloader.dataset.data_root={root}/',
            *[f'{k}={v}' for k, v in SEG_R18.items()]]
    ckpt = save_random_checkpoint(SEG_CONFIG, str(tmp_path / 'fp.pth'), SEG_R18)
    common = ['ptq.num_images=4', 'ptq.iters=4', 'ptq.calib_num_workers=0', 'ptq.w_observer=minmax',
              'ptq.method_options.schedule=paper']  # 4 iterations: the budget schedule's x100 rates are noise
    metrics = main([SEG_CONFIG, '--checkpoint', ckpt, '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                    *data, *common, 'ptq.method=pdquant', 'ptq.method_options.dc_iters=2'])
    report = json.loads((tmp_path / 'work' / 'ptq_report.json').read_text())
    assert report['method']['name'] == 'pdquant'
    rows = report['prediction_loss']
    assert [r['name'] for r in rows] == [u['name'] for u in report['plan']] and len(rows) == 11
    assert all(r['pd_loss_after'] > 0 for r in rows)
    assert sum(r['pd_loss_after'] < r['pd_loss_before'] for r in rows) >= 8
    again = main([SEG_CONFIG, '--load-quantized', str(tmp_path / 'work' / 'quantized.pth'),
                  '--work-dir', str(tmp_path / 'eval'), '--cfg-options', *data])
    assert again == metrics and metrics['mIoU'] > 0
