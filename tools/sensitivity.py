"""Which units hurt most when quantized? Per-unit sensitivity and a mixed-precision suggestion (command line: ``python tools/sensitivity.py -h``; see qdrop_mm/cli/sensitivity.py)."""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.cli.sensitivity import main, parse_args  # noqa: E402,F401

if __name__ == '__main__':
    main()
