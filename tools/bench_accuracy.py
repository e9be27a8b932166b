"""Accuracy benchmark on the demo models: FP vs RTN / AdaRound / BRECQ / QDrop at several bit widths.

    python tools/bench_accuracy.py [--models faster_rcnn_r18_fpn_shapes ...] [--bits 4/4 2/4]
        [--methods rtn adaround brecq qdrop] [--iters 300] [--num-images 32] [--seeds 3] [--threads 1]
        [--val-images 1000] [--curve 2/4] [--no-run] [--markdown]

The logic is in qdrop_mm/benchmarks/accuracy.py (its docstring says what the table marks).
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.accuracy import main  # noqa: E402

if __name__ == '__main__':
    main()
