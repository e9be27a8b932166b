"""Tests for the synthetic shapes COCO generator and its CLI."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qdrop_mm.demo.shapes_dataset import (  # noqa: E402
    CLASSES,
    LARGE_AREA,
    SMALL_AREA,
    generate_shapes_dataset,
    render_image,
)

TINY = dict(num_train=6, num_val=3, image_size=128)


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tight_xywh(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1])


def _images(out: Path, split: str) -> list:
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((out / f"{split}2017").glob("*.jpg"))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes_a")
    generate_shapes_dataset(out, seed=0, **TINY)
    return out


def test_layout_and_meta(tiny: Path) -> None:
    for split, n in (("train", 6), ("val", 3)):
        assert len(list((tiny / f"{split}2017").glob("*.jpg"))) == n
        assert len(list((tiny / "seg" / f"{split}2017").glob("*.png"))) == n
        assert (tiny / "annotations" / f"instances_{split}2017.json").is_file()
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES)
    assert meta["seg_classes"][0] == "background" and len(meta["seg_classes"]) == len(CLASSES) + 1
    assert len(meta["palette"]) == len(CLASSES) + 1
    assert meta["params"]["seed"] == 0 and meta["params"]["image_size"] == 128


def test_deterministic_and_seed_dependent(tiny: Path, tmp_path: Path) -> None:
    same, other = tmp_path / "same", tmp_path / "other"
    generate_shapes_dataset(same, seed=0, **TINY)
    generate_shapes_dataset(other, seed=1, **TINY)
    for split in ("train", "val"):
        ann = f"annotations/instances_{split}2017.json"
        assert (tiny / ann).read_bytes() == (same / ann).read_bytes()
        assert (tiny / ann).read_bytes() != (other / ann).read_bytes()
        a, b, c = _images(tiny, split), _images(same, split), _images(other, split)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not any(np.array_equal(x, z) for x, z in zip(a, c))
    assert (tiny / "meta.json").read_bytes() == (same / "meta.json").read_bytes()


def test_image_independent_of_split_size() -> None:
    img_a, sem_a, _ = render_image(0, "train", 2, 128)
    img_b, sem_b, _ = render_image(0, "train", 2, 128)
    img_v, _, _ = render_image(0, "val", 2, 128)
    assert np.array_equal(img_a, img_b) and np.array_equal(sem_a, sem_b)
    assert not np.array_equal(img_a, img_v)


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_match_masks(tiny: Path, split: str) -> None:
    coco = COCO(str(tiny / "annotations" / f"instances_{split}2017.json"))
    assert sorted(coco.getCatIds()) == list(range(1, len(CLASSES) + 1))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getAnnIds()) >= 2 * len(coco.getImgIds())
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        semantic = cv2.imread(str(tiny / "seg" / f"{split}2017" / info["file_name"].replace(".jpg", ".png")),
                              cv2.IMREAD_UNCHANGED)
        assert semantic.dtype == np.uint8 and semantic.shape == (info["height"], info["width"])
        covered = np.zeros(semantic.shape, np.int32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            mask = coco.annToMask(ann).astype(bool)
            assert ann["iscrowd"] == 0 and ann["category_id"] in coco.cats
            assert ann["area"] == int(mask.sum()) > 0
            assert np.abs(np.array(ann["bbox"]) - _tight_xywh(mask)).max() <= 1
            assert ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1
            assert np.all(semantic[mask] == ann["category_id"])
            covered += mask
        assert covered.max() <= 1
        assert np.all(semantic[covered == 0] == 0)


def test_visible_fraction_and_semantic_consistency() -> None:
    for index in range(5):
        _, semantic, instances = render_image(3, "train", index, 128, min_objects=6, max_objects=8)
        assert len(instances) >= 2
        for inst in instances:
            assert inst.mask.sum() >= 0.3 * inst.full_area
            assert np.all(semantic[inst.mask] == inst.category_id)
        union = np.logical_or.reduce([inst.mask for inst in instances])
        assert np.all(semantic[~union] == 0)


def test_size_distribution_covers_coco_buckets() -> None:
    areas, classes = [], set()
    for index in range(60):
        _, _, instances = render_image(0, "train", index, 256)
        areas += [int(inst.mask.sum()) for inst in instances]
        classes |= {inst.category_id for inst in instances}
    areas = np.array(areas)
    small, large = (areas < SMALL_AREA).mean(), (areas > LARGE_AREA).mean()
    assert 0.05 <= small <= 0.4
    assert 0.03 <= large <= 0.4
    assert 1.0 - small - large >= 0.4
    assert classes == set(range(1, len(CLASSES) + 1))
    assert 200 <= len(areas) <= 60 * 8


def test_cli_skip_and_force(tmp_path: Path, capsys) -> None:
    cli = _load_cli()
    out = tmp_path / "cli"

    def args(num_train: int = 3, seed: int = 5) -> list:
        return ["--out", str(out), "--num-train", str(num_train), "--num-val", "2", "--size", "96",
                "--seed", str(seed)]

    argv = args()
    assert cli.main(argv) == 0
    assert "generated" in capsys.readouterr().out
    stray = out / "train2017" / "stray.jpg"
    stray.write_bytes(b"x")

    assert cli.main(argv) == 0
    assert "up to date, skipping" in capsys.readouterr().out
    assert stray.exists()

    assert cli.main(argv + ["--force"]) == 0
    assert "generated" in capsys.readouterr().out
    assert not stray.exists()

    assert cli.main(args(seed=6)) == 0
    assert "generated" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["params"]["seed"] == 6

    assert cli.main(args(num_train=1, seed=6)) == 0
    assert "generated" in capsys.readouterr().out
    assert len(list((out / "train2017").glob("*.jpg"))) == 1
