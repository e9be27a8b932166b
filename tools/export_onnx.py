"""Export a quantized model to ONNX in QDQ form (command line: ``python tools/export_onnx.py -h``; see qdrop_mm/cli/export_onnx.py)."""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.cli.export_onnx import main, parse_args  # noqa: E402,F401

if __name__ == '__main__':
    main()
