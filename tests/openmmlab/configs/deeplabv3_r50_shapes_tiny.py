# configs/deeplabv3_r50_w4a4.py on a tiny generated shapes dataset (set data_root with --cfg-options).
_base_ = ['../../../configs/deeplabv3_r50_w4a4.py']
data_root = None
classes = ('background', 'circle', 'rectangle', 'triangle', 'ring', 'cross', 'star')
palette = [[i * 30, 255 - i * 30, (i * 70) % 255] for i in range(7)]
model = dict(data_preprocessor=dict(size=None, size_divisor=8),
             decode_head=dict(num_classes=7), auxiliary_head=dict(num_classes=7))
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                  dict(type='RandomFlip', prob=0.5), dict(type='PackSegInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
_dataset = dict(type='BaseSegDataset', metainfo=dict(classes=classes, palette=palette),
                img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(
    _delete_=True, **_dataset, data_prefix=dict(img_path='train2017', seg_map_path='seg/train2017'),
    pipeline=train_pipeline))
test_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(
    _delete_=True, **_dataset, data_prefix=dict(img_path='val2017', seg_map_path='seg/val2017'),
    pipeline=test_pipeline))
val_dataloader = test_dataloader
