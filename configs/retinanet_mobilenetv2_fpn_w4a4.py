# RetinaNet with a MobileNetV2 backbone + FPN at 1000x600 (the MobileNetV2
# resolution of the QDrop detection protocol), QDrop W4A4.
# OpenMMLab publishes no COCO checkpoint for this detector: train one with
# mmdet (ImageNet-initialised MobileNetV2 from mmpretrain) and pass it with
# --checkpoint. λ = 0.1 for MobileNetV2 as in the authors' code.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_2x_coco.py', './_base_/ptq_qdrop.py']
load_from = None
model = dict(
    backbone=dict(_delete_=True, type='MobileNetV2', out_indices=(2, 4, 6), act_cfg=dict(type='ReLU6'),
                  init_cfg=None),
    neck=dict(in_channels=[32, 96, 320], start_level=0, add_extra_convs='on_output', num_outs=5))
ptq = dict(method_options=dict(round_weight=0.1))
_scale = (1000, 600)
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
test_cfg = dict(type='qdrop_mm.PTQLoop')  # quantize, then the standard evaluation
