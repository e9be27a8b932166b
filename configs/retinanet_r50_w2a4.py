# RetinaNet R50-FPN, QDrop W2A4. QDrop paper (authors' code): 34.0 box AP.
_base_ = ['./retinanet_r50_w4a4.py']
ptq = dict(w_bits=2)
