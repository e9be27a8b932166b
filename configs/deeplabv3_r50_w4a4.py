# DeepLabV3 R50-D8 (dilated ResNetV1c) on COCO-Stuff 164k (mmseg checkpoint, mIoU 39.38), QDrop W4A4.
# Backbone quantized; decode and auxiliary heads stay FP. Evaluated with IoUMetric (mIoU).
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-80k_coco-stuff164k-512x512.py', './_base_/ptq_qdrop.py']
load_from = ('https://download.openmmlab.com/mmsegmentation/v0.5/deeplabv3/'
             'deeplabv3_r50-d8_512x512_4x4_80k_coco-stuff164k/'
             'deeplabv3_r50-d8_512x512_4x4_80k_coco-stuff164k_20210709_163016-88675c24.pth')
model = dict(pretrained=None, backbone=dict(init_cfg=None))
ptq = dict(scope=['backbone'])
test_cfg = dict(type='qdrop_mm.PTQLoop')  # quantize, then the standard evaluation
