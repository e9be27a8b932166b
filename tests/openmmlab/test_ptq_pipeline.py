"""End to end through tools/ptq.py on real COCO images (../shared/coco128), random FP weights.

Exercises configs/faster_rcnn_r50_w4a4.py itself, shrunk by --cfg-options:
calibration on the train split, block plan, reconstruction, quantized.pth,
CocoMetric, ptq_report.json, and --load-quantized reproducing the metrics.
"""
import json
import os.path as osp

import pytest
import torch

from qdrop_mm.core import QuantLayer
from qdrop_mm.openmmlab import PTQSettings
from qdrop_mm.openmmlab.block_plan import plan_model

from .conftest import REPO, build_model_from_config, save_random_checkpoint

CONFIG = 'configs/faster_rcnn_r50_w4a4.py'


def _coco128_options(root):
    return [
        f'train_dataloader.dataset.data_root={root}/', f'test_dataloader.dataset.data_root={root}/',
        f'test_evaluator.ann_file={root}/annotations/instances_val2017.json',
        'train_dataloader.dataset.pipeline.2.scale=(224,160)', 'test_dataloader.dataset.pipeline.1.scale=(224,160)',
        'test_dataloader.dataset.indices=6', 'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
        'model.test_cfg.rcnn.score_thr=0.0', 'model.test_cfg.rpn.nms_pre=200', 'model.test_cfg.rpn.max_per_img=100',
        'ptq.num_images=4', 'ptq.iters=30', 'ptq.calib_num_workers=0', 'ptq.w_observer=minmax',
    ]


@pytest.fixture(scope='module')
def quantized_run(tmp_path_factory, coco128):
    from tools.ptq import main
    tmp = tmp_path_factory.mktemp('frcnn')
    ckpt = save_random_checkpoint(CONFIG, str(tmp / 'fp.pth'))
    work = tmp / 'work'
    metrics = main([osp.join(REPO, CONFIG), '--checkpoint', ckpt, '--work-dir', str(work),
                    '--cfg-options', *_coco128_options(coco128), 'ptq.holdout_images=2'])
    return ckpt, work, metrics


def test_feature_error_on_calibration_and_held_out_images(quantized_run):
    _, work, _ = quantized_run
    report = json.loads((work / 'ptq_report.json').read_text())
    fe = report['feature_error']
    assert fe['held_out_images'] == 2
    assert 0 < fe['calibration'] < 1 and 0 < fe['held_out'] < 1
    assert report['settings']['num_images'] == 4 and report['settings']['holdout_images'] == 2


def test_report_units_losses_and_metric_keys(quantized_run):
    _, work, metrics = quantized_run
    report = json.loads((work / 'ptq_report.json').read_text())
    assert 'coco/bbox_mAP' in metrics and 'coco/bbox_mAP' in report['metrics']
    assert report['settings']['method'] == 'qdrop' and report['settings']['w_bits'] == 4
    names = [u['name'] for u in report['units']]
    assert names == [u['name'] for u in report['plan']]
    assert len(names) == 1 + 16 + 8 and names[0] == 'backbone.conv1' and names[-1] == 'neck.fpn_convs.3'
    assert all(u['iters'] == 30 and u['seconds'] > 0 for u in report['units'])
    # 30 iterations on random weights: a unit or two may end a hair above its start (budget or paper rates alike)
    improved = [u['loss_after'] < u['loss_before'] for u in report['units']]
    assert sum(improved) >= 0.8 * len(improved), [u['name'] for u, ok in zip(report['units'], improved) if not ok]
    assert sum(u['loss_after'] for u in report['units']) < sum(u['loss_before'] for u in report['units'])
    assert report['units'][0]['w_bits'] == [8]


def test_saved_model_on_grid_and_heads_untouched(quantized_run):
    ckpt, work, _ = quantized_run
    saved = torch.load(work / 'quantized.pth', weights_only=True)
    fp = torch.load(ckpt, weights_only=True)['state_dict']
    cfg, model = build_model_from_config(CONFIG)
    fp_convs = sum(isinstance(m, torch.nn.Conv2d) for part in (model.backbone, model.neck) for m in part.modules())
    plan_model(model, PTQSettings.from_cfg(saved['meta']['ptq']))
    model.load_state_dict(saved['state_dict'])
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    assert len(layers) == fp_convs
    for layer in layers:
        q = layer.weight_quantizer
        assert q.mode == 'hard'
        s, z = q.scale.reshape(-1, 1, 1, 1), q.zero_point.reshape(-1, 1, 1, 1)
        levels = layer.quantized_weight() / s + z
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert levels.round().min() >= 0 and levels.round().max() <= 2 ** q.bits - 1
    for key, value in saved['state_dict'].items():
        if key.startswith(('rpn_head', 'roi_head')):
            assert torch.equal(value, fp[key]), key


def test_load_quantized_reproduces_metrics(quantized_run, coco128, tmp_path):
    from tools.ptq import main
    _, work, metrics = quantized_run
    again = main([osp.join(REPO, CONFIG), '--load-quantized', str(work / 'quantized.pth'),
                  '--work-dir', str(tmp_path / 'eval'), '--cfg-options', *_coco128_options(coco128)])
    assert again == metrics
    report = json.loads((tmp_path / 'eval' / 'ptq_report.json').read_text())
    assert report['units'] == [] and report['loaded_from'].endswith('quantized.pth')
