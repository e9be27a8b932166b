"""A stand-in for ../shared/coco128 on a clone that does not have it: same layout, generated images.

The end-to-end tests exercise the real data path (JPEG decode, COCO json, CocoMetric, semantic PNGs);
they use the real COCO images when ``../shared/coco128`` is present and this generated folder otherwise,
so the same assertions run everywhere. The json lists COCO's 80 categories with their official ids, like
the real files; the shapes (category ids 1..6) become boxes of the first six (person ... bus).
"""
from __future__ import annotations

import json
import os.path as osp
import shutil

from qdrop_mm.demo.shapes_dataset import generate_shapes_dataset

# the official ids of COCO's 80 thing classes, in mmdet's CocoDataset class order
COCO_IDS = (list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) + list(range(46, 66))
            + [67, 70] + list(range(72, 83)) + list(range(84, 91)))
NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 24, 8, 192


def coco_categories() -> list:
    from mmdet.datasets import CocoDataset
    names = CocoDataset.METAINFO['classes']
    assert len(names) == len(COCO_IDS) == 80
    return [{'id': i, 'name': n, 'supercategory': 'thing'} for i, n in zip(COCO_IDS, names)]


def make_coco_standin(out_dir: str) -> str:
    """Write ``train2017/``, ``val2017/``, ``annotations/instances_*.json`` and ``stuff/`` under ``out_dir``."""
    generate_shapes_dataset(out_dir, NUM_TRAIN, NUM_VAL, image_size=IMAGE_SIZE, seed=128)
    for split in ('train2017', 'val2017'):
        path = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        with open(path) as f:
            coco = json.load(f)
        coco['categories'] = coco_categories()
        with open(path, 'w') as f:
            json.dump(coco, f)
        shutil.copytree(osp.join(out_dir, 'seg', split), osp.join(out_dir, 'stuff', split))
    with open(osp.join(out_dir, 'stuff', 'classes.json'), 'w') as f:
        json.dump({'0': 'unlabeled', **{str(c['id']): c['name'] for c in coco_categories()}}, f)
    return out_dir
