"""Train a small FP demo model on the synthetic shapes task and publish its weights.

Example::

    python tools/train_demo.py configs/demo/faster_rcnn_r18_fpn_shapes.py
    python tools/train_demo.py configs/demo/retinanet_r18_fpn_shapes.py --work-dir work_dirs/demo/retina
    python tools/train_demo.py configs/demo/fcn_r18_shapes.py --cfg-options train_cfg.max_iters=200

Generates ``data_root`` from the config's ``demo_data`` when missing, trains with
mmengine's Runner, validates on the val split and writes ``<work-dir>/fp_model.pth``
(``{'state_dict', 'meta'}``, loadable with ``torch.load(weights_only=True)``) and
``<work-dir>/fp_metrics.json``. If the work dir already holds a model published from the
identical (merged) config, training is skipped and the cached metrics are printed,
unless ``--force``. Default work dir: ``work_dirs/demo/<config name>``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmengine.config import DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402

from qdrop_mm.demo.training import train_fp_model  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    """Train or reuse the FP model; print its metrics; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="demo config, e.g. configs/demo/faster_rcnn_r18_fpn_shapes.py")
    parser.add_argument("--work-dir", help="output directory (default work_dirs/demo/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                        help="override config keys, e.g. train_cfg.max_iters=100 data_root=/tmp/shapes/")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching fp_model.pth exists")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for training (default: torch's; 1 is much faster on a "
                             "small CPU shared with other jobs)")
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"error: config file not found: {args.config}", file=sys.stderr)
        return 2
    result = train_fp_model(args.config, args.work_dir, args.cfg_options, args.force, args.threads)
    print_log(f"{'cached' if result['cached'] else 'trained'}: {result['checkpoint']} ({result['iterations']} iters, "
              f"{result['s_per_iter']:.3f} s/iter, training {result['train_seconds']:.0f}s)", logger="current")
    print(json.dumps(result["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
