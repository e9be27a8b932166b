"""Deterministic synthetic "shapes" detection + segmentation task in COCO 2017 layout.

The task is small enough to train FP detectors/segmentors on a CPU, yet real enough
(varied sizes, rotation, occlusion, textured clutter) that quantization damage shows up
in bbox/segm mAP and mIoU.

Layout written under ``out_dir``::

    train2017/000000000001.jpg ...        RGB images (JPEG, quality 95)
    val2017/...
    annotations/instances_train2017.json  COCO instances (RLE segmentation)
    annotations/instances_val2017.json
    seg/train2017/000000000001.png ...    semantic labels, uint8: 0 = background,
    seg/val2017/...                       c = COCO category id c (1..K)
    meta.json                             classes, palette, params, counts, version

Every image is rendered from its own ``numpy.random.Generator(PCG64)`` seeded with
``(seed, split, index)``, so outputs are byte-identical for identical arguments and an
image does not depend on how many other images are generated.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

VERSION = "shapes-v1"
CLASSES: Tuple[str, ...] = ("circle", "rectangle", "triangle", "ring", "cross", "star")
SEG_CLASSES: Tuple[str, ...] = ("background",) + CLASSES
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
)
SPLITS: Dict[str, int] = {"train": 0, "val": 1}
JPEG_QUALITY = 95
SMALL_AREA = 32 ** 2  # COCO eval's absolute area-bucket thresholds (32^2, 96^2)
LARGE_AREA = 96 ** 2
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 12
MAX_LARGE_PER_IMAGE = 2
PLACEMENT_TRIES = 25
_SUBPIXEL_SHIFT = 4
_AREA_BUCKETS = (  # (probability, min, max) of the shape's pixel area at 256 px
    (0.15, 120.0, 900.0),
    (0.55, 1300.0, 8000.0),
    (0.3, 10000.0, 16000.0),
)


@dataclass
class Instance:
    """One visible object of a rendered image."""

    category_id: int
    mask: np.ndarray
    full_area: int


def _rotate(points: np.ndarray, theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return points @ np.array([[c, s], [-s, c]])


def _regular_polygon(radius: float, n: int) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _shape_contours(name: str, extent: float, rng: np.random.Generator) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Outer contours and holes of a shape centred at the origin, spanning ~``extent`` px."""
    r = extent / 2.0
    theta = rng.uniform(0.0, 2.0 * np.pi)
    if name in ("circle", "ring"):  # rotation-invariant: not rotated
        holes = [_regular_polygon(r * rng.uniform(0.45, 0.65), 64)] if name == "ring" else []
        return [_regular_polygon(r, 64)], holes
    if name == "rectangle":
        aspect = rng.uniform(0.55, 1.0)
        hw, hh = r / np.sqrt(1.0 + aspect ** 2), aspect * r / np.sqrt(1.0 + aspect ** 2)
        poly = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
    elif name == "triangle":
        angles = np.array([0.0, 2.0 * np.pi / 3, 4.0 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        poly = r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif name == "cross":
        t = r * rng.uniform(0.28, 0.42)
        poly = np.array([
            [-t, -r], [t, -r], [t, -t], [r, -t], [r, t], [t, t],
            [t, r], [-t, r], [-t, t], [-r, t], [-r, -t], [-t, -t],
        ])
    elif name == "star":
        poly = np.empty((10, 2))
        poly[0::2] = _regular_polygon(r, 5)
        poly[1::2] = _rotate(_regular_polygon(r * rng.uniform(0.38, 0.5), 5), np.pi / 5)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return [_rotate(poly, theta)], []


def _fill(canvas: np.ndarray, contours: Sequence[np.ndarray], value: int) -> None:
    if contours:
        pts = [np.round(c * (1 << _SUBPIXEL_SHIFT)).astype(np.int32) for c in contours]
        cv2.fillPoly(canvas, pts, value, lineType=cv2.LINE_8, shift=_SUBPIXEL_SHIFT)


def _rasterise(outer: List[np.ndarray], holes: List[np.ndarray], offset: np.ndarray, size: int) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    _fill(canvas, [c + offset for c in outer], 1)
    _fill(canvas, [c + offset for c in holes], 0)
    return canvas.astype(bool)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    coarse = rng.normal(0.0, 1.0, (cells, cells, channels)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).reshape(size, size, channels)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured clutter: colour gradient + smooth noise + optional stripes, all random."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phi = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(phi) * xx + np.sin(phi) * yy)[..., None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    c0, c1 = rng.uniform(40, 215, 3).astype(np.float32), rng.uniform(40, 215, 3).astype(np.float32)
    img = c0 * (1.0 - ramp) + c1 * ramp
    img = img + rng.uniform(10, 35) * _smooth_noise(rng, size, int(rng.integers(3, 9)), 3)
    if rng.random() < 0.5:
        psi = rng.uniform(0.0, np.pi)
        period = rng.uniform(0.04, 0.2)
        wave = np.sin(2.0 * np.pi * (np.cos(psi) * xx + np.sin(psi) * yy) / period)[..., None]
        img = img + wave * rng.uniform(-30, 30, 3).astype(np.float32)
    return img


def _draw_distractors(img: np.ndarray, rng: np.random.Generator) -> None:
    """Thin lines and small dots that are clutter, not objects."""
    size = img.shape[0]
    for _ in range(int(rng.integers(1, 6))):
        p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])),
                 rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(2, 11))):
        c = rng.integers(0, size, 2)
        cv2.circle(img, (int(c[0]), int(c[1])), int(rng.integers(1, 4)),
                   rng.uniform(0, 255, 3).tolist(), -1, cv2.LINE_AA)


def _sample_area(rng: np.random.Generator, scale: float, allow_large: bool) -> Tuple[float, bool]:
    """Target area, log-uniform within a COCO size bucket (thresholds scaled with the image)."""
    probs = np.array([b[0] for b in _AREA_BUCKETS])
    if not allow_large:
        probs[-1] = 0.0
    bucket = int(rng.choice(len(_AREA_BUCKETS), p=probs / probs.sum()))
    _, lo, hi = _AREA_BUCKETS[bucket]
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) * scale ** 2, bucket == len(_AREA_BUCKETS) - 1


def _polygon_area(contour: np.ndarray) -> float:
    x, y = contour[:, 0], contour[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _sample_colour(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Random colour, resampled a few times to differ from the background under it."""
    under = img[mask].mean(axis=0)
    for _ in range(9):  # the first draw and up to 8 resamples
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - under).max() >= 60:
            break
    return colour


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    ys, xs = np.nonzero(mask)
    phi = rng.uniform(0.0, 2.0 * np.pi)
    shade = (np.cos(phi) * xs + np.sin(phi) * ys).astype(np.float32)
    shade = (shade - shade.mean()) / max(float(np.ptp(shade)), 1.0)
    img[ys, xs] = colour + shade[:, None] * rng.uniform(0, 40)


def _visible_after(inst_map: np.ndarray, mask: np.ndarray, visible: List[int]) -> List[int]:
    """Visible pixels left to each earlier object once ``mask`` is painted over it."""
    covered = inst_map[mask]
    return [v - int(lost) for v, lost in zip(visible, np.bincount(covered[covered >= 0], minlength=len(visible)))]


def _place_object(rng: np.random.Generator, size: int, allow_large: bool) -> Tuple[int, np.ndarray, bool]:
    """Sample class, area, shape parameters and a position keeping the shape inside the image."""
    cls = int(rng.integers(len(CLASSES)))
    target, is_large = _sample_area(rng, size / 256.0, allow_large)
    outer, holes = _shape_contours(CLASSES[cls], 1.0, rng)
    unit_area = sum(map(_polygon_area, outer)) - sum(map(_polygon_area, holes))
    extent = min(np.sqrt(target / unit_area), 0.95 * size)
    outer, holes = [c * extent for c in outer], [c * extent for c in holes]
    pts = np.concatenate(outer)
    lo, hi = -pts.min(axis=0), size - 1 - pts.max(axis=0)
    offset = rng.uniform(lo, np.maximum(hi, lo))
    return cls + 1, _rasterise(outer, holes, offset, size), is_large


def render_image(
    seed: int, split: str, index: int, image_size: int = 256, min_objects: int = 2, max_objects: int = 8
) -> Tuple[np.ndarray, np.ndarray, List[Instance]]:
    """Render one image; returns (BGR uint8 image, uint8 semantic label map, visible instances).

    Later objects occlude earlier ones; a placement is rejected if it would leave any
    earlier object with less than ``MIN_VISIBLE_FRACTION`` of its area visible, so every
    painted object is annotated and masks/boxes describe visible pixels only.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLITS[split], index])))
    img = _background(rng, image_size)
    _draw_distractors(img, rng)
    inst_map = np.full((image_size, image_size), -1, np.int16)
    cats: List[int] = []
    visible: List[int] = []
    full: List[int] = []
    num_large = 0
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _ in range(PLACEMENT_TRIES):
            cat, mask, is_large = _place_object(rng, image_size, num_large < MAX_LARGE_PER_IMAGE)
            area, left = int(mask.sum()), _visible_after(inst_map, mask, visible)
            if area >= MIN_VISIBLE_PIXELS and all(v >= max(MIN_VISIBLE_FRACTION * f, MIN_VISIBLE_PIXELS)
                                                  for v, f in zip(left, full)):
                break
        else:
            continue
        _paint(img, mask, _sample_colour(rng, img, mask), rng)
        inst_map[mask] = len(cats)
        cats.append(cat)
        visible = left + [area]
        full.append(area)
        num_large += int(is_large)
    img += rng.uniform(1.0, 5.0) * rng.standard_normal(img.shape, dtype=np.float32)
    img_u8 = np.clip(np.round(img), 0, 255).astype(np.uint8)
    lut = np.array([0] + cats, np.uint8)
    semantic = lut[inst_map.astype(np.int32) + 1]
    instances = [Instance(c, inst_map == k, f) for k, (c, f) in enumerate(zip(cats, full))]
    return img_u8, semantic, instances


def encode_rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO compressed RLE (json-serialisable) of a boolean mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _write_split(
    out: Path, split: str, num_images: int, image_size: int, seed: int, min_objects: int, max_objects: int
) -> Dict[str, Any]:
    img_dir, seg_dir, ann_dir = out / f"{split}2017", out / "seg" / f"{split}2017", out / "annotations"
    for d in (img_dir, seg_dir, ann_dir):
        d.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    buckets = {"small": 0, "medium": 0, "large": 0}
    for index in range(num_images):
        img, semantic, instances = render_image(seed, split, index, image_size, min_objects, max_objects)
        image_id = index + 1
        stem = f"{image_id:012d}"
        cv2.imwrite(str(img_dir / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        cv2.imwrite(str(seg_dir / f"{stem}.png"), semantic)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": image_size, "height": image_size})
        for inst in instances:
            area = int(inst.mask.sum())
            buckets["small" if area < SMALL_AREA else "medium" if area <= LARGE_AREA else "large"] += 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": inst.category_id,
                "bbox": list(cv2.boundingRect(inst.mask.astype(np.uint8))), "area": area, "iscrowd": 0,
                "segmentation": encode_rle(inst.mask),
            })
    coco = {
        "info": {"description": f"qdrop_mm synthetic shapes ({VERSION})", "version": VERSION},
        "licenses": [], "images": images, "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    ann_file = ann_dir / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps(coco, separators=(",", ":")))
    return {"ann_file": str(ann_file), "img_dir": str(img_dir), "seg_dir": str(seg_dir),
            "num_images": num_images, "num_instances": len(annotations), "size_buckets": buckets}


def dataset_params(
    num_train: int, num_val: int, image_size: int = 256, seed: int = 0, min_objects: int = 2, max_objects: int = 8
) -> Dict[str, Any]:
    """Arguments that fully determine the output; stored in meta.json to detect stale data."""
    return {"version": VERSION, "seed": seed, "image_size": image_size, "num_train": num_train,
            "num_val": num_val, "min_objects": min_objects, "max_objects": max_objects}


def load_meta(out_dir: str | Path) -> Optional[Dict[str, Any]]:
    """meta.json of an existing dataset, or None if absent/unreadable."""
    try:
        return json.loads((Path(out_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(out_dir: str | Path, params: Dict[str, Any]) -> bool:
    """True if ``out_dir`` holds a complete dataset generated with exactly ``params``."""
    meta = load_meta(out_dir)
    return meta is not None and meta.get("params") == params


def _clear_outputs(out: Path) -> None:
    (out / "meta.json").unlink(missing_ok=True)
    for sub in ("train2017", "val2017", "seg", "annotations"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)


def generate_shapes_dataset(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    image_size: int = 256,
    seed: int = 0,
    min_objects: int = 2,
    max_objects: int = 8,
) -> Dict[str, Any]:
    """Write the dataset under ``out_dir`` (replacing earlier generator outputs there).

    Returns ``{"out_dir", "meta_file", "params", "splits": {split: {ann_file, img_dir,
    seg_dir, num_images, num_instances, size_buckets}}}``. meta.json is written last, so
    an interrupted run is never mistaken for a complete one.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError("need 1 <= min_objects <= max_objects")
    if image_size < 32:
        raise ValueError("image_size must be >= 32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out)
    params = dataset_params(num_train, num_val, image_size, seed, min_objects, max_objects)
    splits = {
        split: _write_split(out, split, n, image_size, seed, min_objects, max_objects)
        for split, n in (("train", num_train), ("val", num_val))
    }
    meta = {
        "params": params,
        "classes": list(CLASSES),
        "seg_classes": list(SEG_CLASSES),
        "palette": [list(c) for c in PALETTE],
        "category_ids": {name: i + 1 for i, name in enumerate(CLASSES)},
        "conventions": {
            "images": "{split}2017/{image_id:012d}.jpg, BGR-encoded by cv2, JPEG quality %d" % JPEG_QUALITY,
            "instances": "annotations/instances_{split}2017.json; bbox = tight xywh of the visible mask; "
                         "area = visible mask pixels; segmentation = compressed RLE",
            "semantic": "seg/{split}2017/{image_id:012d}.png, uint8; 0 = background, "
                        "c = category id c (1..K); num_classes = K + 1; no ignore index",
        },
        "counts": {s: {k: v[k] for k in ("num_images", "num_instances", "size_buckets")} for s, v in splits.items()},
    }
    meta_file = out / "meta.json"
    meta_file.write_text(json.dumps(meta, indent=2))
    return {"out_dir": str(out), "meta_file": str(meta_file), "params": params, "splits": splits}
