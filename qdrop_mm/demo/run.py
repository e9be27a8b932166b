"""The embedded default (``make demo``): QDrop W4A4 on the demo Faster R-CNN R18-FPN, FP against quantized mAP."""
from __future__ import annotations

import os.path as osp
import time
from typing import Any, Dict, Mapping, Optional

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
FP_CONFIG = osp.join(REPO, 'configs/demo/faster_rcnn_r18_fpn_shapes.py')
PTQ_CONFIG = osp.join(REPO, 'configs/demo/faster_rcnn_r18_fpn_shapes_w4a4.py')
WORK_DIR = osp.join(REPO, 'work_dirs/demo/faster_rcnn_r18_fpn_shapes_w4a4')
KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75', 'coco/bbox_mAP_s', 'coco/bbox_mAP_m', 'coco/bbox_mAP_l')


def comparison_table(fp: dict, quant: dict, label: str) -> str:
    lines = [f"{'metric':<20} {'FP':>8} {label:>12} {'delta':>8}"]
    for k in KEYS:
        if k in fp and k in quant:
            lines.append(f'{k:<20} {fp[k]:>8.3f} {quant[k]:>12.3f} {quant[k] - fp[k]:>+8.3f}')
    return '\n'.join(lines)


def run_demo(work_dir: str = WORK_DIR, cfg_options: Optional[Mapping[str, Any]] = None,
             threads: int = 1) -> Dict[str, Any]:
    """Train (or reuse) the FP model, quantize it with the W4A4 config, print FP against quantized metrics and
    write ``work_dir/demo_summary.json`` (the returned dict); a PTQ problem exits with ``error: <message>``."""
    import torch
    torch.set_num_threads(threads)
    from qdrop_mm.api import quantize
    from qdrop_mm.demo.training import train_fp_model
    from qdrop_mm.openmmlab.atomic_io import atomic_write_json
    from qdrop_mm.openmmlab.runner import exit_on_error
    t0 = time.perf_counter()
    fp = train_fp_model(FP_CONFIG, osp.join(REPO, 'work_dirs/demo/faster_rcnn_r18_fpn_shapes'))
    t1 = time.perf_counter()
    quant = exit_on_error(quantize, PTQ_CONFIG, fp['checkpoint'], work_dir=work_dir, cfg_options=cfg_options).metrics
    t2 = time.perf_counter()
    summary = {'fp': fp['metrics'], 'quantized': {k: float(v) for k, v in quant.items()},
               'fp_cached': fp['cached'], 'seconds': {'fp_model': t1 - t0, 'ptq_and_eval': t2 - t1}}
    atomic_write_json(summary, osp.join(work_dir, 'demo_summary.json'))
    print('\nqdrop_mm demo: Faster R-CNN R18-FPN on the generated shapes val split\n'
          + comparison_table(fp['metrics'], quant, 'QDrop W4A4'))
    print(f"FP model: {'cached' if fp['cached'] else 'trained'} ({t1 - t0:.0f} s); "
          f'PTQ + evaluation: {t2 - t1:.0f} s; report: {osp.join(work_dir, "ptq_report.json")}')
    return summary
