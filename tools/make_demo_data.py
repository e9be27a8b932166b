"""Generate the synthetic shapes detection/segmentation task (COCO 2017 layout).

Example::

    python tools/make_demo_data.py --out data/shapes --num-train 400 --num-val 100 --size 256 --seed 0

Skips work when ``--out`` already holds a dataset whose meta.json matches the
arguments (and generator version), unless ``--force`` is given.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdrop_mm.demo.shapes_dataset import (  # noqa: E402
    dataset_params,
    generate_shapes_dataset,
    is_up_to_date,
    load_meta,
)


def main(argv: Optional[List[str]] = None) -> int:
    """Generate the dataset unless an identical one already exists; return exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/shapes", help="output directory")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=8)
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    out = Path(args.out)
    params = dataset_params(args.num_train, args.num_val, args.size, args.seed, args.min_objects, args.max_objects)
    if not args.force and is_up_to_date(out, params):
        print(f"up to date, skipping: {out} (use --force to regenerate)")
    else:
        start = time.perf_counter()
        generate_shapes_dataset(out, args.num_train, args.num_val, args.size, args.seed,
                                args.min_objects, args.max_objects)
        print(f"generated {out} in {time.perf_counter() - start:.1f}s")
    meta = load_meta(out)
    print(f"  {out / 'meta.json'}")
    for split, counts in meta["counts"].items():
        print(f"  {split}: {counts['num_images']} images in {out / f'{split}2017'}, "
              f"{counts['num_instances']} instances ({counts['size_buckets']}) in "
              f"{out / 'annotations' / f'instances_{split}2017.json'}, "
              f"semantic masks in {out / 'seg' / f'{split}2017'}")
    print(f"  classes: {meta['classes']} (category ids 1..{len(meta['classes'])}; "
          f"semantic label 0 = background)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
