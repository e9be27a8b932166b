"""Coverage of stock mmdet / mmseg configs: does PTQ run, reload identically, and quantize everything in scope?

Usage and logic: qdrop_mm/benchmarks/coverage.py.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.coverage import main  # noqa: E402

if __name__ == '__main__':
    main()
