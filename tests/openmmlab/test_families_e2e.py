"""Mask R-CNN (bbox + segm mAP) and DeepLabV3 (mIoU) end to end on a tiny generated dataset."""
import json
import os.path as osp

import pytest

from qdrop_mm.demo.shapes_dataset import generate_shapes_dataset

from .conftest import REPO, save_random_checkpoint

HERE = osp.dirname(osp.abspath(__file__))
# 20 iterations: the paper's learning rates (the budget schedule's x100 rates are noisy at tens of iterations)
COMMON = ['ptq.num_images=4', 'ptq.iters=20', 'ptq.calib_num_workers=0', 'ptq.w_observer=minmax',
          'ptq.method_options.schedule=paper']


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    generate_shapes_dataset(root, num_train=6, num_val=3, image_size=96, seed=1)
    return str(root)


def _run(config, tmp_path, options):
    from tools.ptq import main
    ckpt = save_random_checkpoint(config, str(tmp_path / 'fp.pth'))
    metrics = main([config, '--checkpoint', ckpt, '--work-dir', str(tmp_path / 'work'), '--cfg-options', *options])
    return metrics, json.loads((tmp_path / 'work' / 'ptq_report.json').read_text())


def test_mask_rcnn_box_and_mask_map(shapes, tmp_path):
    config = osp.join(HERE, 'configs', 'mask_rcnn_r50_shapes_tiny.py')
    metrics, report = _run(config, tmp_path, [
        f'train_dataloader.dataset.data_root={shapes}/', f'test_dataloader.dataset.data_root={shapes}/',
        f'test_evaluator.ann_file={shapes}/annotations/instances_val2017.json', *COMMON])
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= set(report['metrics'])
    assert len(report['units']) == 25
    # random weights, 2 calibration batches, 20 iterations: most units, and the total, must improve;
    # the strict every-unit check runs on coco128 (test_ptq_pipeline) and on the trained demo model
    assert sum(u['loss_after'] < u['loss_before'] for u in report['units']) >= 22
    assert sum(u['loss_after'] for u in report['units']) < 0.95 * sum(u['loss_before'] for u in report['units'])


def test_deeplabv3_miou(shapes, tmp_path):
    config = osp.join(HERE, 'configs', 'deeplabv3_r50_shapes_tiny.py')
    metrics, report = _run(config, tmp_path, [
        f'train_dataloader.dataset.data_root={shapes}/', f'test_dataloader.dataset.data_root={shapes}/', *COMMON])
    assert 'mIoU' in report['metrics'] and 0.0 <= report['metrics']['mIoU'] <= 100.0
    names = [u['name'] for u in report['units']]
    assert names[:3] == ['backbone.stem.0', 'backbone.stem.3', 'backbone.stem.6'] and len(names) == 19
    assert all(u['loss_after'] < u['loss_before'] for u in report['units'])
