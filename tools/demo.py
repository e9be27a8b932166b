"""The embedded default: QDrop W4A4 on a small detector trained here, FP vs quantized mAP.

    python tools/demo.py            (or: make demo)

Generates the shapes data if missing, trains the demo Faster R-CNN R18-FPN if
no published model matches its config (cached in work_dirs/demo/), runs
tools/ptq.py on configs/demo/faster_rcnn_r18_fpn_shapes_w4a4.py and prints FP
against quantized COCO metrics (see qdrop_mm/demo/run.py).
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.demo.run import WORK_DIR, run_demo  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--work-dir', default=WORK_DIR)
    p.add_argument('--cfg-options', nargs='+', default=[], help='override config keys of the PTQ run, e.g. ptq.iters=300')
    p.add_argument('--threads', type=int, default=1,
                   help='torch CPU threads (default 1: float sums, and so the learned rounding, depend on it)')
    args = p.parse_args(argv)
    from qdrop_mm.openmmlab.runner import parse_cfg_options
    return run_demo(args.work_dir, parse_cfg_options(args.cfg_options), args.threads)


if __name__ == '__main__':
    main()
