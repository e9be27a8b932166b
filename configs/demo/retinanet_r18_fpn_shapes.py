# RetinaNet, ResNet-18 (base_channels=32) + FPN, trained from scratch on the synthetic shapes
# task; sized for a 2-core CPU. The head convs get GroupNorm (from-scratch stability; the head
# is not part of the quantized backbone + neck).
# python tools/train_demo.py configs/demo/retinanet_r18_fpn_shapes.py
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    './_base_/shapes_det.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

max_iters = 2000
warmup_iters = 100
base_channels = 32  # ResNet-18 layout (BasicBlock x [2, 2, 2, 2]) at half width
fpn_channels = 64

model = dict(
    backbone=dict(
        depth=18,
        base_channels=base_channels,
        frozen_stages=-1,  # from scratch: train every stage and the BN statistics
        norm_eval=False,
        init_cfg=None),  # no pretrained download
    neck=dict(in_channels=[base_channels * 2**i for i in range(4)], out_channels=fpn_channels),
    bbox_head=dict(
        num_classes=6,
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        # anchors 16..~400 px on P3..P7: objects span ~10..180 px at 256 px
        anchor_generator=dict(octave_base_scale=2)),
    test_cfg=dict(nms_pre=500))

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', T_max=max_iters - warmup_iters, eta_min=1e-5, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]
auto_scale_lr = dict(enable=False, base_batch_size=4)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    # one mmengine checkpoint at the end only; tools/train_demo.py publishes fp_model.pth
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1, save_last=True, save_best=None))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
