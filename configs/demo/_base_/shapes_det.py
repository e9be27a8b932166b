# Detection data on the synthetic "shapes" task (qdrop_mm.demo.shapes_dataset), COCO layout.
# tools/train_demo.py generates the data from `demo_data` when `data_root` lacks it, and
# keeps every pipeline `Resize` scale equal to demo_data['image_size'] and every path under
# `data_root` consistent when these are overridden with --cfg-options.
_base_ = 'mmdet::_base_/datasets/coco_detection.py'

data_root = 'data/shapes/'
# Generator arguments (qdrop_mm.demo.shapes_dataset.generate_shapes_dataset). Keep identical
# in shapes_seg.py so detectors and segmentors share one data/shapes.
demo_data = dict(num_train=400, num_val=100, image_size=256, seed=0)
img_scale = (256, 256)  # == demo_data['image_size']: train and test at the native size

dataset_type = 'CocoDataset'
metainfo = dict(
    classes=('circle', 'rectangle', 'triangle', 'ring', 'cross', 'star'),
    palette=[(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
             (145, 30, 180)])
backend_args = None

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # shapes have no canonical orientation: flip both ways
    dict(type='RandomFlip', prob=[0.25, 0.25], direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader

val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val2017.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator
