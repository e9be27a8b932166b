# configs/mask_rcnn_r50_w4a4.py on a tiny generated shapes dataset (instance masks as RLE).
_base_ = ['../../../configs/mask_rcnn_r50_w4a4.py']
classes = ('circle', 'rectangle', 'triangle', 'ring', 'cross', 'star')
model = dict(roi_head=dict(bbox_head=dict(num_classes=6), mask_head=dict(num_classes=6)),
             test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=50), rcnn=dict(score_thr=0.0, max_per_img=20)))
_scale = (128, 96)
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                  dict(type='Resize', scale=_scale, keep_ratio=True), dict(type='RandomFlip', prob=0.5),
                  dict(type='PackDetInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=_scale, keep_ratio=True),
                 dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                 dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(
    metainfo=dict(classes=classes), pipeline=train_pipeline))
test_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(
    metainfo=dict(classes=classes), ann_file='annotations/instances_val2017.json',
    data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
val_dataloader = test_dataloader
