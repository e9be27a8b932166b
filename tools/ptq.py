"""Quantize an mmdet/mmseg model with QDrop (or RTN/AdaRound/BRECQ) and evaluate it (command line: ``python tools/ptq.py -h``; see qdrop_mm/cli/ptq.py)."""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.cli.ptq import main, parse_args  # noqa: E402,F401

if __name__ == '__main__':
    main()
