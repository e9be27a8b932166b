# Semantic FPN (ResNetV1c-18 + FPN neck + FPNHead), trained from scratch on the shapes task.
# python tools/train_demo.py configs/demo/sem_fpn_r18_shapes.py
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    './_base_/shapes_seg.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
]

max_iters = 1000
fpn_channels = 64
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN needs a process group

model = dict(
    data_preprocessor=dict(size_divisor=32),
    pretrained=None,  # no download: train from scratch
    backbone=dict(depth=18, norm_cfg=norm_cfg, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=fpn_channels),
    decode_head=dict(
        in_channels=[fpn_channels] * 4, channels=64, num_classes=7, norm_cfg=norm_cfg))

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='PolyLR', eta_min=1e-4, power=0.9, by_epoch=False, begin=100, end=max_iters),
]

default_hooks = dict(
    logger=dict(interval=20),
    # one mmengine checkpoint at the end only; tools/train_demo.py publishes fp_model.pth
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1, save_last=True,
                    save_best=None))
randomness = dict(seed=0)
