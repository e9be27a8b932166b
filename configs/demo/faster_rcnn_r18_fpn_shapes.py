# Faster R-CNN, ResNet-18 + FPN, trained from scratch on the synthetic shapes task.
# Sized for a 2-core CPU: the qdrop_mm demo trains it in a few minutes
# (python tools/train_demo.py configs/demo/faster_rcnn_r18_fpn_shapes.py).
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    './_base_/shapes_det.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

max_iters = 800
fpn_channels = 64

model = dict(
    backbone=dict(
        depth=18,
        frozen_stages=-1,  # from scratch: train every stage and the BN statistics
        norm_eval=False,
        init_cfg=None),  # no pretrained download
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=fpn_channels),
    rpn_head=dict(
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        # anchors 16..256 px: objects span ~10..180 px at 256 px
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_channels),
        bbox_head=dict(in_channels=fpn_channels, fc_out_channels=256, num_classes=6)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)))

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', T_max=max_iters - 100, eta_min=1e-4, by_epoch=False,
         begin=100, end=max_iters),
]
auto_scale_lr = dict(enable=False, base_batch_size=4)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    # one mmengine checkpoint at the end only; tools/train_demo.py publishes fp_model.pth
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1, save_last=True, save_best=None))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
