# QDrop W4A4 on the demo Semantic FPN R18 trained by tools/train_demo.py on the generated shapes data
# (python tools/train_demo.py configs/demo/sem_fpn_r18_shapes.py); settings as for the demo Faster R-CNN
# (faster_rcnn_r18_fpn_shapes_w4a4.py): 32 calibration images, 300 iterations per unit.
_base_ = ['./sem_fpn_r18_shapes.py', '../_base_/ptq_qdrop.py']
load_from = 'work_dirs/demo/sem_fpn_r18_shapes/fp_model.pth'
ptq = dict(num_images=32, iters=300, calib_num_workers=0)
test_cfg = dict(type='qdrop_mm.PTQLoop')
