# configs/faster_rcnn_r50_w4a4.py shrunk for the reliability tests (resume, validation, determinism):
# ResNet-18 FPN, 160x128 images, 4 calibration images, 4 iterations per unit, min/max observers.
# Set the coco128 data roots with --cfg-options (see tests/openmmlab/test_resume.py).
_base_ = ['../../../configs/faster_rcnn_r50_w4a4.py']
model = dict(backbone=dict(depth=18), neck=dict(in_channels=[64, 128, 256, 512]),
             test_cfg=dict(rpn=dict(nms_pre=100, max_per_img=50), rcnn=dict(score_thr=0.0, max_per_img=20)))
_scale = (160, 128)
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
                  dict(type='Resize', scale=_scale, keep_ratio=True),
                  dict(type='RandomFlip', prob=0.5),  # random: calibration data must still be rebuilt identically
                  dict(type='PackDetInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=_scale, keep_ratio=True),
                 dict(type='LoadAnnotations', with_bbox=True),
                 dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(pipeline=train_pipeline))
test_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline, indices=2))
val_dataloader = test_dataloader
ptq = dict(num_images=4, batch_size=2, iters=4, calib_num_workers=0, w_observer='minmax', a_observer='minmax')
