"""Reconstruction speed and memory: seconds per iteration against a plain FP fwd+bwd of the same unit.

Usage and logic: qdrop_mm/benchmarks/speed.py.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.speed import main  # noqa: E402

if __name__ == '__main__':
    main()
