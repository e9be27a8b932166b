# Faster R-CNN R50-FPN, QDrop W2A4. QDrop paper (authors' code): 35.0 box AP.
_base_ = ['./faster_rcnn_r50_w4a4.py']
ptq = dict(w_bits=2)
