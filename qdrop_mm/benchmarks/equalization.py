"""Would per-channel equalization help the 4-bit activations inside the demo model's blocks?

Inside a ResNet BasicBlock the activation between conv1 (+BN+ReLU) and conv2 is quantized per tensor.
Scaling channel c of that activation by 1/s_c and input channel c of conv2 by s_c leaves the FP block
unchanged (ReLU is positively homogeneous) but moves error between the per-tensor activation grid and
conv2's per-output-channel weight grid. This study measures conv2's relative output error at
``bits``/``bits`` for s_c = amax_c^α / wmax_c^(1−α) (α = 0: weight-only cross-layer equalization's
direction, α = 0.5: SmoothQuant's), on the FP demo model's own activations.
"""
from __future__ import annotations

import argparse
import glob
import os.path as osp
import sys
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qdrop_mm.core.bn_fold import fold_bn
from qdrop_mm.core.fake_quant import fake_quantize, qparams_from_range, quant_max
from qdrop_mm.core.observers import MSEObserver

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75)


def mse_quantize(x: Tensor, bits: int, ch_axis=None) -> Tensor:
    """x on the L2.4-optimal grid the project's calibration would choose (per tensor or per channel)."""
    obs = MSEObserver(bits, ch_axis)
    obs.observe(x)
    scale, zp = qparams_from_range(obs.min_val, obs.max_val, quant_max(bits))
    if ch_axis is not None:
        shape = [-1] + [1] * (x.dim() - 1)
        scale, zp = scale.view(shape), zp.view(shape)
    return fake_quantize(x, scale, zp, quant_max(bits))


def equalization_errors(a: Tensor, weight: Tensor, bias: Tensor, padding: int, bits: int,
                        alphas: Sequence[float]) -> Dict[str, float]:
    """conv2's relative output error (‖y_q − y‖² / ‖y‖²) without and with equalization at each α."""
    y = F.conv2d(a, weight, bias, padding=padding)
    amax = a.transpose(0, 1).reshape(a.shape[1], -1).amax(1).clamp_min(1e-6)
    wmax = weight.abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1).clamp_min(1e-8)
    out = {'channel_range_ratio': (amax.max() / amax.median()).item()}
    for name, s in [('none', torch.ones_like(amax))] + [(f'alpha_{al}', amax ** al / wmax ** (1 - al))
                                                         for al in alphas]:
        s = (s / s.median()).view(1, -1, 1, 1)
        yq = F.conv2d(mse_quantize(a / s, bits), mse_quantize(weight * s, bits, ch_axis=0), bias, padding=padding)
        out[name] = ((yq - y) ** 2).sum().item() / (y ** 2).sum().item()
    return out


def study(config: str, checkpoint: str, num_images: int, bits: int, alphas: Sequence[float]) -> List[dict]:
    """One row per BasicBlock of the FP demo model: its activation's channel range ratio and the errors."""
    import cv2
    from qdrop_mm.demo.training import build_fp_model, load_demo_config
    cfg = load_demo_config(config)
    model = build_fp_model(cfg, checkpoint)
    files = sorted(glob.glob(osp.join(cfg.data_root, 'train2017', '*.jpg')))[:num_images]
    images = [torch.from_numpy(cv2.imread(f)).permute(2, 0, 1).contiguous() for f in files]
    inputs: Dict[str, Tensor] = {}
    blocks = {n: m for n, m in model.backbone.named_modules() if type(m).__name__ == 'BasicBlock'}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: inputs.__setitem__(n, i[0])) for n, m in blocks.items()]
    with torch.no_grad():
        model.extract_feat(model.data_preprocessor({'inputs': images, 'data_samples': None}, False)['inputs'])
        for h in handles:
            h.remove()
        rows = []
        for name, blk in blocks.items():
            w1, b1 = fold_bn(blk.conv1.weight, None, blk.norm1)
            w2, b2 = fold_bn(blk.conv2.weight, None, blk.norm2)
            a = F.relu(F.conv2d(inputs[name], w1, b1, blk.conv1.stride, blk.conv1.padding))
            rows.append({'block': f'backbone.{name}', **equalization_errors(a, w2, b2, blk.conv2.padding, bits, alphas)})
    return rows


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default=osp.join(REPO, 'configs/demo/faster_rcnn_r18_fpn_shapes.py'))
    p.add_argument('--checkpoint', default=osp.join(REPO, 'work_dirs/demo/faster_rcnn_r18_fpn_shapes/fp_model.pth'))
    p.add_argument('--num-images', type=int, default=16)
    p.add_argument('--bits', type=int, default=4)
    p.add_argument('--alphas', type=float, nargs='+', default=list(DEFAULT_ALPHAS))
    p.add_argument('--out', default=osp.join(REPO, 'work_dirs/equalization/equalization.json'))
    args = p.parse_args(argv)
    from qdrop_mm.openmmlab.atomic_io import atomic_write_json
    torch.set_num_threads(1)
    rows = study(args.config, args.checkpoint, args.num_images, args.bits, args.alphas)
    keys = ['none'] + [f'alpha_{al}' for al in args.alphas]
    print(f"{'block':<20}{'range ratio':>12}" + ''.join(f'{k:>13}' for k in keys))
    for r in rows:
        print(f"{r['block']:<20}{r['channel_range_ratio']:>12.1f}" + ''.join(f'{r[k]:>13.4f}' for k in keys))
    print(f"{'mean':<32}" + ''.join(f'{sum(r[k] for r in rows) / len(rows):>13.4f}' for k in keys))
    command = 'python tools/study_equalization.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    atomic_write_json({'command': command, 'bits': args.bits, 'num_images': args.num_images, 'rows': rows}, args.out)
    print(f'wrote {args.out}')
    return rows
