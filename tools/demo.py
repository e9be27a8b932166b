"""The embedded default: QDrop W4A4 on a small detector trained here, FP vs quantized mAP.

    python tools/demo.py            (or: make demo)

Generates the shapes data if missing, trains the demo Faster R-CNN R18-FPN if
no published model matches its config (cached in work_dirs/demo/), runs
tools/ptq.py on configs/demo/faster_rcnn_r18_fpn_shapes_w4a4.py and prints FP
against quantized COCO metrics.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

FP_CONFIG = osp.join(REPO, 'configs/demo/faster_rcnn_r18_fpn_shapes.py')
PTQ_CONFIG = osp.join(REPO, 'configs/demo/faster_rcnn_r18_fpn_shapes_w4a4.py')
KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75', 'coco/bbox_mAP_s', 'coco/bbox_mAP_m', 'coco/bbox_mAP_l')


def comparison_table(fp: dict, quant: dict, label: str) -> str:
    lines = [f"{'metric':<20} {'FP':>8} {label:>12} {'delta':>8}"]
    for k in KEYS:
        if k in fp and k in quant:
            lines.append(f'{k:<20} {fp[k]:>8.3f} {quant[k]:>12.3f} {quant[k] - fp[k]:>+8.3f}')
    return '\n'.join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs/demo/faster_rcnn_r18_fpn_shapes_w4a4'))
    p.add_argument('--cfg-options', nargs='+', default=[], help='override config keys of the PTQ run, e.g. ptq.iters=300')
    p.add_argument('--threads', type=int, default=1,
                   help='torch CPU threads (default 1: float sums, and so the learned rounding, depend on it)')
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from qdrop_mm.demo.training import train_fp_model
    from qdrop_mm.api import quantize
    from qdrop_mm.openmmlab.atomic_io import atomic_write_json
    from qdrop_mm.openmmlab.runner import exit_on_error, parse_cfg_options
    t0 = time.perf_counter()
    fp = train_fp_model(FP_CONFIG, osp.join(REPO, 'work_dirs/demo/faster_rcnn_r18_fpn_shapes'))
    t1 = time.perf_counter()
    quant = exit_on_error(quantize, PTQ_CONFIG, fp['checkpoint'], work_dir=args.work_dir,
                          cfg_options=parse_cfg_options(args.cfg_options)).metrics
    t2 = time.perf_counter()
    table = comparison_table(fp['metrics'], quant, 'QDrop W4A4')
    summary = {'fp': fp['metrics'], 'quantized': {k: float(v) for k, v in quant.items()},
               'fp_cached': fp['cached'], 'seconds': {'fp_model': t1 - t0, 'ptq_and_eval': t2 - t1}}
    atomic_write_json(summary, osp.join(args.work_dir, 'demo_summary.json'))
    print('\nqdrop_mm demo: Faster R-CNN R18-FPN on the generated shapes val split\n' + table)
    print(f"FP model: {'cached' if fp['cached'] else 'trained'} ({t1 - t0:.0f} s); "
          f'PTQ + evaluation: {t2 - t1:.0f} s; report: {osp.join(args.work_dir, "ptq_report.json")}')
    return summary


if __name__ == '__main__':
    main()
