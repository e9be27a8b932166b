"""Would per-channel equalization help the demo model's 4-bit in-block activations? A table and JSON.

    python tools/study_equalization.py [--num-images 16] [--bits 4] [--alphas 0 0.25 0.5 0.75]

The logic is in qdrop_mm/benchmarks/equalization.py.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.equalization import main  # noqa: E402

if __name__ == '__main__':
    main()
