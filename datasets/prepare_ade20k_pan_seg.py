#!/usr/bin/env python3
"""Make COCO-format panoptic annotations for ADE20K (150 classes, 100 of them things).

Reads, under $DETECTRON2_DATASETS/ADEChallengeData2016:
  images/{training,validation}/*.jpg
  annotations/{training,validation}/*.png           semantic labels, 0 = void, 1..150 = classes
  annotations_instance/{training,validation}/*.png  instance labels of the 2017 challenge: red =
                                                    instance class 1..100, green = instance id
Writes ade20k_panoptic_{train,val}/*.png (ids in RGB, panopticapi's id2rgb) and
ade20k_panoptic_{train,val}.json, read by ``ade20k_panoptic_*``.

Stuff segments come from the semantic labels, thing segments from the instance labels, painted
over the stuff (the two annotations overlap a little). Category ids are the 150-class ids 0..149.

Usage: python datasets/prepare_ade20k_pan_seg.py
"""

import argparse
import copy
import json
import logging
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
from panopticapi.utils import IdGenerator, rgb2id
from PIL import Image
from detectron2.utils.logger import setup_logger

# Run as a script from a checkout: make the package importable without installing it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from kmax_m2f.data.datasets.checks import (  # noqa: E402
    DatasetError,
    datasets_root,
    require_dir,
    require_file,
)
from kmax_m2f.data.datasets.register_ade20k_instance import (  # noqa: E402
    ADE20K_IMAGES_HINT,
    ADE20K_INSTANCE_CATEGORIES,
    ADE20K_INSTANCE_HINT,
    ADE20K_SPLIT_FOLDERS,
)
from kmax_m2f.data.datasets.register_ade20k_panoptic import ADE20K_150_CATEGORIES  # noqa: E402

logger = logging.getLogger("kmax_m2f.datasets.prepare_ade20k_pan_seg")

_NAME = "ADE20K (prepare_ade20k_pan_seg.py)"


def panoptic_categories() -> list[dict]:
    """The categories written to the panoptic JSON.

    Stuff segment ids are the colours of their categories (panopticapi's IdGenerator), so two
    stuff classes may not share a colour: "skyscraper" (48) gets its own, as in the official
    converter, instead of the registered metadata's copy of "road".
    """
    categories = copy.deepcopy(ADE20K_150_CATEGORIES)
    categories[48]["color"] = [140, 140, 200]
    return categories


def read_instance_png(path: str, shape: tuple[int, int]) -> np.ndarray:
    """An annotations_instance PNG as an HxWx3 uint8 array, checked against the label's shape."""
    instance = np.asarray(Image.open(require_file(path, _NAME, ADE20K_INSTANCE_HINT)).convert("RGB"))
    if instance.shape[:2] != shape:
        raise DatasetError(
            f"{path}: size {instance.shape[1]}x{instance.shape[0]} differs from its image's "
            f"{shape[1]}x{shape[0]}. The instance and semantic annotations are from different "
            f"releases."
        )
    return instance


def ade20k_to_panoptic(
    semantic: np.ndarray,
    instance: np.ndarray,
    categories: list[dict],
    id_generator: IdGenerator,
    where: str,
) -> tuple[np.ndarray, list[dict]]:
    """One image's panoptic PNG (HxWx3 uint8) and ``segments_info``.

    Args:
        semantic: HxW uint8, 0 = void, 1..150 = the 150 classes.
        instance: HxWx3 uint8, red = instance class 1..100 (ADE20K_INSTANCE_CATEGORIES[k - 1]),
            green = instance id, 0 = no instance.
        categories: :func:`panoptic_categories`.
        where: the files' names, for error messages.
    """
    if semantic.max() > 150:
        raise DatasetError(f"{where}: semantic label {semantic.max()} is out of range 0..150.")
    panoptic = np.zeros(semantic.shape + (3,), dtype=np.uint8)
    segment_categories = {}  # segment id -> category id

    def paint(mask: np.ndarray, category_id: int) -> None:
        segment_id, color = id_generator.get_id_and_color(category_id)
        panoptic[mask] = color
        segment_categories[segment_id] = category_id

    for label in np.unique(semantic):
        if label != 0 and not categories[label - 1]["isthing"]:
            paint(semantic == label, int(label) - 1)
    classes, instance_ids = instance[..., 0], instance[..., 1]
    for instance_id in np.unique(instance_ids):
        if instance_id == 0:
            continue
        mask = instance_ids == instance_id
        instance_classes = np.unique(classes[mask])
        if len(instance_classes) != 1 or not 1 <= instance_classes[0] <= 100:
            raise DatasetError(
                f"{where}: instance {instance_id} has class value(s) "
                f"{instance_classes.tolist()} in the red channel; each instance needs exactly one "
                f"class in 1..100."
            )
        paint(mask, ADE20K_INSTANCE_CATEGORIES[instance_classes[0] - 1]["id"])

    # Areas and boxes are measured on the final PNG: things painted over a stuff region shrink
    # it, and a stuff region they cover entirely must not be listed.
    ids = rgb2id(panoptic)
    segments_info = []
    for segment_id, category_id in segment_categories.items():
        rle = mask_util.encode(np.asfortranarray(ids == segment_id, dtype=np.uint8))
        area = int(mask_util.area(rle))
        if area:
            segments_info.append(
                {
                    "id": int(segment_id),
                    "category_id": category_id,
                    "area": area,
                    "bbox": [int(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    return panoptic, segments_info


def convert_ade20k_panoptic(ade_root: str, split: str) -> str:
    """Write ``ade20k_panoptic_{split}/`` and ``ade20k_panoptic_{split}.json`` under ``ade_root``
    (the ADEChallengeData2016 folder) for ``split`` "train" or "val"; returns the JSON's path."""
    folder = ADE20K_SPLIT_FOLDERS[split]
    image_dir = require_dir(os.path.join(ade_root, "images", folder), _NAME, ADE20K_IMAGES_HINT)
    semantic_dir = require_dir(os.path.join(ade_root, "annotations", folder), _NAME, ADE20K_IMAGES_HINT)
    instance_dir = require_dir(
        os.path.join(ade_root, "annotations_instance", folder), _NAME, ADE20K_INSTANCE_HINT
    )
    out_dir = os.path.join(ade_root, f"ade20k_panoptic_{split}")
    out_json = os.path.join(ade_root, f"ade20k_panoptic_{split}.json")
    os.makedirs(out_dir, exist_ok=True)

    file_names = sorted(f for f in os.listdir(image_dir) if f.endswith(".jpg"))
    if not file_names:
        raise DatasetError(f"{image_dir!r} holds no .jpg images. {ADE20K_IMAGES_HINT}")
    categories = panoptic_categories()
    categories_by_id = {c["id"]: c for c in categories}
    images, annotations = [], []
    for i, file_name in enumerate(file_names):
        stem = os.path.splitext(file_name)[0]
        semantic_file = require_file(os.path.join(semantic_dir, stem + ".png"), _NAME, ADE20K_IMAGES_HINT)
        instance_file = os.path.join(instance_dir, stem + ".png")
        semantic = np.asarray(Image.open(semantic_file))
        width, height = Image.open(os.path.join(image_dir, file_name)).size
        if semantic.shape != (height, width):
            raise DatasetError(
                f"{semantic_file}: shape {semantic.shape} does not match its image's size "
                f"{width}x{height}, or the label is not single-channel."
            )
        panoptic, segments_info = ade20k_to_panoptic(
            semantic,
            read_instance_png(instance_file, semantic.shape),
            categories,
            IdGenerator(categories_by_id),
            where=f"{semantic_file} / {instance_file}",
        )
        Image.fromarray(panoptic).save(os.path.join(out_dir, stem + ".png"))
        images.append({"id": stem, "file_name": file_name, "width": width, "height": height})
        annotations.append(
            {"image_id": stem, "file_name": stem + ".png", "segments_info": segments_info}
        )
        if (i + 1) % 1000 == 0:
            logger.info(f"{split}: {i + 1}/{len(file_names)} images")

    with open(out_json, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    logger.info(f"Wrote {len(annotations)} panoptic PNGs to {out_dir} and {out_json}")
    return out_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    splits = list(ADE20K_SPLIT_FOLDERS)
    parser.add_argument("--splits", nargs="+", choices=splits, default=splits)
    args = parser.parse_args()
    setup_logger(name="kmax_m2f")
    # IdGenerator draws thing colours (= segment ids) from numpy's global generator: seed it so
    # that re-running the script writes identical files.
    np.random.seed(0)
    for split in args.splits:
        convert_ade20k_panoptic(os.path.join(datasets_root(), "ADEChallengeData2016"), split)


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
