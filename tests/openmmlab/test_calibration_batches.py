"""Calibration batches: ptq.calib_batch_size images per forward, ptq.batch_size left to reconstruction."""
from qdrop_mm.openmmlab import PTQSettings
from qdrop_mm.openmmlab.calibration import build_calibration_batches, num_images

from .conftest import build_model_from_config

CONFIG = 'tests/openmmlab/configs/faster_rcnn_r18_coco128_tiny.py'


def test_calibration_batches_follow_calib_batch_size(coco128):
    cfg, _ = build_model_from_config(CONFIG, {'train_dataloader.dataset.data_root': f'{coco128}/'})
    settings = PTQSettings.from_cfg(dict(cfg.ptq, num_images=6, batch_size=2, calib_batch_size=3))
    batches = build_calibration_batches(cfg, settings)
    assert [len(b['inputs']) for b in batches] == [3, 3] and num_images(batches) == 6
    assert settings.build_method().stages[0].batch_size == 2
