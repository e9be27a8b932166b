# Mask R-CNN R50-FPN (mmdet "2x" COCO checkpoint: box AP 39.2, mask AP 35.4), QDrop W4A4.
# Evaluated with CocoMetric on bbox and segm. No published QDrop figure for this model.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py', './_base_/ptq_qdrop.py']
load_from = ('https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/mask_rcnn_r50_fpn_2x_coco/'
             'mask_rcnn_r50_fpn_2x_coco_bbox_mAP-0.392__segm_mAP-0.354_20200505_003907-3e542a40.pth')
model = dict(backbone=dict(init_cfg=None))
test_cfg = dict(type='qdrop_mm.PTQLoop')  # quantize, then the standard evaluation
