"""Time exported ONNX graphs in onnxruntime's CPU provider, count integer kernels (see qdrop_mm/export/bench.py)."""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.export.bench import export_fp32, graphs_from_args, main, parse_args  # noqa: E402,F401

if __name__ == '__main__':
    main()
