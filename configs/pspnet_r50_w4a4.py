# PSPNet R50-D8 (dilated ResNetV1c) on COCO-Stuff 164k (mmseg checkpoint, mIoU 38.8), QDrop W4A4.
# Backbone quantized; decode and auxiliary heads stay FP. Evaluated with IoUMetric (mIoU).
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb4-80k_coco-stuff164k-512x512.py', './_base_/ptq_qdrop.py']
load_from = ('https://download.openmmlab.com/mmsegmentation/v0.5/pspnet/'
             'pspnet_r50-d8_512x512_4x4_80k_coco-stuff164k/'
             'pspnet_r50-d8_512x512_4x4_80k_coco-stuff164k_20210707_152034-0e41b2db.pth')
model = dict(pretrained=None, backbone=dict(init_cfg=None))
ptq = dict(scope=['backbone'])
test_cfg = dict(type='qdrop_mm.PTQLoop')  # quantize, then the standard evaluation
