"""Block output MSE of RTN / AdaRound / BRECQ / QDrop (or any method with options) on seeded residual networks.

Usage and logic: qdrop_mm/benchmarks/block_mse.py.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.block_mse import main  # noqa: E402

if __name__ == '__main__':
    main()
