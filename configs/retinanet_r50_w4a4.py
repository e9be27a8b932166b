# RetinaNet R50-FPN (mmdet "2x" COCO checkpoint, box AP 37.4), QDrop W4A4.
# QDrop paper (authors' code): 35.8 box AP at W4A4.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_2x_coco.py', './_base_/ptq_qdrop.py']
load_from = ('https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_2x_coco/'
             'retinanet_r50_fpn_2x_coco_20200131-fdb43119.pth')
model = dict(backbone=dict(init_cfg=None))
test_cfg = dict(type='qdrop_mm.PTQLoop')  # quantize, then the standard evaluation
