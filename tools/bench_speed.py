"""Reconstruction speed and memory: seconds per iteration against a plain FP fwd+bwd of the same unit.

    python tools/bench_speed.py [--scale 1.0] [--iters 50] [--variants reference fused ...]
        [--e2e-images 4] [--e2e-iters 100] [--device-budget-gb 8] [--out work_dirs/bench_speed.json]
    python tools/bench_speed.py --cpu-blocks [--cpu-iters 200] [--variants reference fused fused_eager]
        [--out docs/results/speed_cpu.json]

The logic is in qdrop_mm/benchmarks/speed.py.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.speed import main  # noqa: E402

if __name__ == '__main__':
    main()
