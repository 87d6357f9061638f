"""Render the synthetic panoptic dataset used by the quick start and the tests.

Each image is a ``size x size`` scene: 2-3 "stuff" regions separated by straight lines (green
noise, blue sine stripes, orange-brown checkerboard), over which 1-5 "thing" shapes (circle,
square, triangle, ellipse, cross) are painted in order, with random size, rotation and colour,
each earlier shape kept at least half visible. Everything is drawn from ``seed`` so the same call
writes the same files.

Files written under ``root`` (the same layout as COCO, see datasets/README.md)::

    {split}/NNNNNN.jpg                       images
    panoptic_{split}/NNNNNN.png              COCO-panoptic PNGs (segment id as RGB)
    panoptic_semseg_{split}/NNNNNN.png       semantic labels, contiguous ids, 255 = ignore
    annotations/panoptic_{split}.json        COCO-panoptic JSON
    annotations/instances_{split}.json       COCO instances JSON (thing classes, RLE masks)
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_util
from panopticapi.utils import id2rgb
from PIL import Image

logger = logging.getLogger(__name__)

# Category ids are deliberately not contiguous (things 1-5, stuff 11-13) so that any code that
# confuses dataset ids with contiguous training ids fails on this data, not only on COCO.
SYNTHETIC_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 0, 230]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [250, 170, 30]},
    {"id": 4, "name": "ellipse", "isthing": 1, "color": [120, 0, 180]},
    {"id": 5, "name": "cross", "isthing": 1, "color": [0, 160, 160]},
    {"id": 11, "name": "grass-noise", "isthing": 0, "color": [60, 180, 60]},
    {"id": 12, "name": "water-stripes", "isthing": 0, "color": [70, 130, 230]},
    {"id": 13, "name": "wood-checker", "isthing": 0, "color": [180, 110, 50]},
]
THING_IDS = [c["id"] for c in SYNTHETIC_CATEGORIES if c["isthing"]]
STUFF_IDS = [c["id"] for c in SYNTHETIC_CATEGORIES if not c["isthing"]]
IGNORE_LABEL = 255

MIN_STUFF_FRACTION = 0.12
MIN_VISIBLE_FRACTION = 0.5
# Shape extents in pixels at the reference image size of 256; scaled with the image size.
SHAPE_SIZE_RANGE = (20, 90)
REFERENCE_SIZE = 256
MAX_PLACEMENT_TRIES = 30


@dataclass
class Segment:
    category_id: int
    mask: np.ndarray  # [H, W] bool


def _stuff_layout(rng: np.random.Generator, size: int) -> np.ndarray:
    """[H, W] int map of 2-3 regions bounded by straight lines (a Voronoi partition of random
    sites), each covering at least MIN_STUFF_FRACTION of the image."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    while True:
        num_regions = int(rng.integers(2, 4))
        sites = rng.uniform(0, size, size=(num_regions, 2)).astype(np.float32)
        dist = (xs[None] - sites[:, 0, None, None]) ** 2 + (ys[None] - sites[:, 1, None, None]) ** 2
        layout = dist.argmin(axis=0)
        fractions = np.bincount(layout.ravel(), minlength=num_regions) / layout.size
        if fractions.min() >= MIN_STUFF_FRACTION:
            return layout


def _stuff_texture(rng: np.random.Generator, category_id: int, size: int) -> np.ndarray:
    """[H, W, 3] float RGB texture of one stuff class."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    if category_id == 11:  # green noise
        base = np.array([60, 150, 50], np.float32) + rng.uniform(-20, 20, 3)
        return base + rng.normal(0, 30, (size, size, 3))
    if category_id == 12:  # blue sine stripes at a random angle and period
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        phase = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
        dark, light = np.array([20, 40, 120], np.float32), np.array([120, 170, 250], np.float32)
        weight = (0.5 + 0.5 * phase)[..., None]
        return dark + weight * (light - dark) + rng.normal(0, 8, (size, size, 3))
    cell = int(rng.integers(4, 17))  # orange-brown checkerboard with a random cell size
    checker = ((xs // cell + ys // cell) % 2)[..., None]
    orange, brown = np.array([230, 140, 40], np.float32), np.array([110, 60, 25], np.float32)
    return orange * checker + brown * (1 - checker) + rng.normal(0, 8, (size, size, 3))


def _rotated(points: np.ndarray, center: np.ndarray, angle: float) -> np.ndarray:
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ rotation.T + center


def _shape_mask(rng: np.random.Generator, category_id: int, size: int) -> np.ndarray:
    """[H, W] bool mask of one randomly sized, rotated and placed shape."""
    extent = rng.uniform(*SHAPE_SIZE_RANGE) * size / REFERENCE_SIZE
    half = extent / 2
    center = rng.uniform(half * 0.5, size - half * 0.5, 2)
    angle = rng.uniform(0, 2 * np.pi)
    canvas = np.zeros((size, size), np.uint8)
    if category_id == 1:
        cv2.circle(canvas, tuple(np.round(center).astype(int)), int(round(half)), 1, -1)
    elif category_id == 4:
        axes = (int(round(half)), int(round(half * rng.uniform(0.35, 0.65))))
        cv2.ellipse(canvas, tuple(np.round(center).astype(int)), axes, np.degrees(angle), 0, 360, 1, -1)
    else:
        if category_id == 2:
            outlines = [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half * 0.8]
        elif category_id == 3:
            corners = np.linspace(0, 2 * np.pi, 4)[:3] - np.pi / 2
            outlines = [np.stack([np.cos(corners), np.sin(corners)], 1) * half]
        else:
            arm = half / 3
            outlines = [
                np.array([[-half, -arm], [half, -arm], [half, arm], [-half, arm]]),
                np.array([[-arm, -half], [arm, -half], [arm, half], [-arm, half]]),
            ]
        # One fillPoly call per outline: a single call fills overlaps by the even-odd rule,
        # which would punch a hole in the middle of the cross.
        for outline in outlines:
            cv2.fillPoly(canvas, [np.round(_rotated(outline, center, angle)).astype(np.int32)], 1)
    return canvas.astype(bool)


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Segment]]:
    """Draw one scene. Returns the [H, W, 3] uint8 image and its visible segments (stuff first,
    then things), whose masks partition the image."""
    layout = _stuff_layout(rng, size)
    region_classes = rng.permutation(STUFF_IDS)[: layout.max() + 1]
    image = np.zeros((size, size, 3), np.float32)
    stuff_map = np.empty((size, size), np.int64)
    for region, category_id in enumerate(region_classes):
        region_mask = layout == region
        image[region_mask] = _stuff_texture(rng, int(category_id), size)[region_mask]
        stuff_map[region_mask] = category_id

    things: list[Segment] = []
    for _ in range(int(rng.integers(1, 6))):
        category_id = int(rng.choice(THING_IDS))
        for _ in range(MAX_PLACEMENT_TRIES):
            mask = _shape_mask(rng, category_id, size)
            # Painting on top must leave every earlier shape at least half visible.
            if mask.any() and all(
                (t.mask & ~mask).sum() >= MIN_VISIBLE_FRACTION * t.mask.sum() for t in things
            ):
                break
        else:
            continue
        for t in things:
            t.mask &= ~mask
        colour = rng.uniform(0, 255, 3)
        image[mask] = colour + rng.normal(0, 10, (int(mask.sum()), 3))
        things.append(Segment(category_id, mask))

    covered = np.zeros((size, size), bool)
    for t in things:
        covered |= t.mask
    stuff = [
        Segment(int(c), (stuff_map == c) & ~covered)
        for c in region_classes
        if ((stuff_map == c) & ~covered).any()
    ]
    return np.clip(image, 0, 255).astype(np.uint8), stuff + things


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _write_split(root: str, split: str, num_images: int, size: int, seed: int) -> None:
    contiguous = {c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)}
    dirs = {d: os.path.join(root, d) for d in (split, f"panoptic_{split}", f"panoptic_semseg_{split}")}
    for d in list(dirs.values()) + [os.path.join(root, "annotations")]:
        os.makedirs(d, exist_ok=True)
    images, panoptic_annotations, instance_annotations = [], [], []
    split_index = {"train": 0, "val": 1}.get(split, 2)
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_index, index])
        image, segments = render_scene(rng, size)
        image_id = index + 1
        stem = f"{image_id:06d}"
        Image.fromarray(image).save(os.path.join(dirs[split], stem + ".jpg"), quality=95)

        panoptic = np.zeros((size, size), np.int64)
        semantic = np.full((size, size), IGNORE_LABEL, np.uint8)
        segments_info = []
        for segment_id, segment in enumerate(segments, start=1):
            panoptic[segment.mask] = segment_id
            semantic[segment.mask] = contiguous[segment.category_id]
            area, bbox = int(segment.mask.sum()), _bbox(segment.mask)
            segments_info.append(
                {"id": segment_id, "category_id": segment.category_id, "iscrowd": 0, "bbox": bbox, "area": area}
            )
            if segment.category_id in THING_IDS:
                rle = mask_util.encode(np.asfortranarray(segment.mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                instance_annotations.append({
                    "id": len(instance_annotations) + 1, "image_id": image_id,
                    "category_id": segment.category_id, "segmentation": rle, "area": area,
                    "bbox": bbox, "iscrowd": 0,
                })
        Image.fromarray(id2rgb(panoptic)).save(os.path.join(dirs[f"panoptic_{split}"], stem + ".png"))
        Image.fromarray(semantic).save(os.path.join(dirs[f"panoptic_semseg_{split}"], stem + ".png"))
        images.append({"id": image_id, "file_name": stem + ".jpg", "width": size, "height": size})
        panoptic_annotations.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": segments_info})

    categories = [
        {"id": c["id"], "name": c["name"], "isthing": c["isthing"], "color": c["color"], "supercategory": "shape"
         if c["isthing"] else "texture"} for c in SYNTHETIC_CATEGORIES
    ]
    info = {"description": f"kmax_m2f synthetic panoptic dataset, seed {seed}, {size}x{size}"}
    with open(os.path.join(root, "annotations", f"panoptic_{split}.json"), "w") as f:
        json.dump({"info": info, "licenses": [], "images": images, "annotations": panoptic_annotations,
                   "categories": categories}, f)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"info": info, "licenses": [], "images": images, "annotations": instance_annotations,
                   "categories": [c for c in categories if c["isthing"]]}, f)


def generate_synthetic_panoptic(
    root: str, num_train: int = 400, num_val: int = 50, size: int = 256, seed: int = 0
) -> None:
    """Write the train and val splits of the synthetic dataset under ``root`` (see module doc)."""
    if size < 32:
        raise ValueError(f"size={size} is too small to draw recognisable shapes; use size >= 32")
    for split, count in (("train", num_train), ("val", num_val)):
        _write_split(root, split, count, size, seed)
        logger.info("synthetic dataset: wrote %d %s images of %dx%d to %s", count, split, size, size, root)
