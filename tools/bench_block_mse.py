"""Block output MSE of RTN / AdaRound / BRECQ / QDrop (or any method with options) on seeded residual networks.

    python tools/bench_block_mse.py [--iters 2000] [--seeds 3] [--bits 4/4 2/4]
        [--methods rtn qdrop qdrop:schedule=budget qdrop:schedule=budget,accum_steps=8] [--out ...]

The logic is in qdrop_mm/benchmarks/block_mse.py.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.block_mse import main  # noqa: E402

if __name__ == '__main__':
    main()
