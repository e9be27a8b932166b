# Semantic segmentation data on the synthetic "shapes" task (qdrop_mm.demo.shapes_dataset):
# seg/{split}2017/*.png hold 0 = background, c = class c (1..6); no ignore label.
# tools/train_demo.py generates the data from `demo_data` when `data_root` lacks it, and
# keeps every pipeline `Resize` scale equal to demo_data['image_size'] and every path under
# `data_root` consistent when these are overridden with --cfg-options.
data_root = 'data/shapes/'
# Generator arguments (qdrop_mm.demo.shapes_dataset.generate_shapes_dataset); identical to
# shapes_det.py so detectors and segmentors share one data/shapes.
demo_data = dict(num_train=400, num_val=100, image_size=256, seed=0)
img_scale = (256, 256)  # == demo_data['image_size']: train and test at the native size

dataset_type = 'BaseSegDataset'
metainfo = dict(
    classes=('background', 'circle', 'rectangle', 'triangle', 'ring', 'cross', 'star'),
    palette=[[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
             [245, 130, 48], [145, 30, 180]])

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=[0.25, 0.25], direction=['horizontal', 'vertical']),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
_dataset = dict(
    type=dataset_type,
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=False)
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        **_dataset,
        data_prefix=dict(img_path='train2017', seg_map_path='seg/train2017'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        **_dataset,
        data_prefix=dict(img_path='val2017', seg_map_path='seg/val2017'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
