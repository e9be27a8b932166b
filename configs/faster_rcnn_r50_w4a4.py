# Faster R-CNN R50-FPN (mmdet "2x" COCO checkpoint, box AP 38.4), QDrop W4A4.
# QDrop paper (authors' code): 37.0 box AP at W4A4.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_2x_coco.py', './_base_/ptq_qdrop.py']
load_from = ('https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_2x_coco/'
             'faster_rcnn_r50_fpn_2x_coco_bbox_mAP-0.384_20200504_210434-a5d8aa15.pth')
model = dict(backbone=dict(init_cfg=None))
test_cfg = dict(type='qdrop_mm.PTQLoop')  # quantize, then the standard evaluation
