"""Accuracy benchmark on the demo models: FP vs RTN / AdaRound / BRECQ / QDrop at several bit widths.

Usage and logic: qdrop_mm/benchmarks/accuracy.py (its docstring says what the table marks).
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.accuracy import main  # noqa: E402

if __name__ == '__main__':
    main()
