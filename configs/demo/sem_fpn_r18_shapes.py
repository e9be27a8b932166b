# Semantic FPN: ResNetV1c-18 (base_channels=32) + FPN neck + FPNHead, trained from scratch
# on the synthetic shapes task (7 classes incl. background); sized for a 2-core CPU.
# python tools/train_demo.py configs/demo/sem_fpn_r18_shapes.py
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    './_base_/shapes_seg.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
]

max_iters = 2200
warmup_iters = 100
base_channels = 32  # ResNet-18 layout (BasicBlock x [2, 2, 2, 2]) at half width
fpn_channels = 64
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN needs a process group

model = dict(
    data_preprocessor=dict(size_divisor=32),
    pretrained=None,  # no download: train from scratch
    backbone=dict(depth=18, stem_channels=base_channels, base_channels=base_channels,
                  norm_cfg=norm_cfg, init_cfg=None),
    neck=dict(in_channels=[base_channels * 2**i for i in range(4)], out_channels=fpn_channels),
    decode_head=dict(
        in_channels=[fpn_channels] * 4, channels=64, num_classes=7, norm_cfg=norm_cfg),
    # deep supervision on FPN level 3 (stride 16; training only), as in mmseg's FCN/PSP/DeepLab configs: the
    # shape classes are learnt faster from scratch
    auxiliary_head=dict(
        type='FCNHead', in_channels=fpn_channels, in_index=2, channels=64, num_convs=1,
        concat_input=False, dropout_ratio=0.1, num_classes=7, norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)))

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', T_max=max_iters - warmup_iters, eta_min=1e-5, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]

default_hooks = dict(
    logger=dict(interval=50),
    # one mmengine checkpoint at the end only; tools/train_demo.py publishes fp_model.pth
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1, save_last=True,
                    save_best=None))
randomness = dict(seed=0)
