# The embedded default: QDrop W4A4 on the demo Faster R-CNN R18-FPN trained by
# tools/train_demo.py on the generated shapes data (no COCO, no download).
# Settings reduced for a 2-core CPU: 32 calibration images, 300 iterations per unit.
_base_ = ['./faster_rcnn_r18_fpn_shapes.py', '../_base_/ptq_qdrop.py']
load_from = 'work_dirs/demo/faster_rcnn_r18_fpn_shapes/fp_model.pth'
ptq = dict(num_images=32, iters=300, calib_num_workers=0)
test_cfg = dict(type='qdrop_mm.PTQLoop')
