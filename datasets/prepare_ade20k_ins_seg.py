#!/usr/bin/env python3
"""Make COCO-format instance annotations for ADE20K (the 100 classes of the instance challenge).

Reads, under $DETECTRON2_DATASETS/ADEChallengeData2016:
  images/{training,validation}/*.jpg
  annotations_instance/{training,validation}/*.png  red = instance class 1..100, green = instance id
Writes ade20k_instance_{train,val}.json (RLE masks), read by ``ade20k_instance_*`` and used as the
instance ground truth of ``ade20k_panoptic_*``. Category ids are the 150-class ids (e.g. bed = 7),
shared with the panoptic annotations.

Usage: python datasets/prepare_ade20k_ins_seg.py
"""

import argparse
import json
import logging
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
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

logger = logging.getLogger("kmax_m2f.datasets.prepare_ade20k_ins_seg")

_NAME = "ADE20K (prepare_ade20k_ins_seg.py)"


def ade20k_to_instances(
    instance: np.ndarray, image_id: str, first_annotation_id: int, where: str
) -> list[dict]:
    """COCO annotations of one annotations_instance PNG (HxWx3 uint8, red = class 1..100,
    green = instance id, 0 = none); ids count up from ``first_annotation_id``."""
    classes, instance_ids = instance[..., 0], instance[..., 1]
    annotations = []
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
        rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
        annotations.append(
            {
                "id": first_annotation_id + len(annotations),
                "image_id": image_id,
                "category_id": ADE20K_INSTANCE_CATEGORIES[instance_classes[0] - 1]["id"],
                "iscrowd": 0,
                "bbox": [int(v) for v in mask_util.toBbox(rle)],
                "area": int(mask_util.area(rle)),
                # JSON needs text; pycocotools accepts the counts as str or bytes.
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }
        )
    return annotations


def convert_ade20k_instance(ade_root: str, split: str) -> str:
    """Write ``ade20k_instance_{split}.json`` under ``ade_root`` (the ADEChallengeData2016 folder)
    for ``split`` "train" or "val"; returns its path."""
    folder = ADE20K_SPLIT_FOLDERS[split]
    image_dir = require_dir(os.path.join(ade_root, "images", folder), _NAME, ADE20K_IMAGES_HINT)
    instance_dir = require_dir(
        os.path.join(ade_root, "annotations_instance", folder), _NAME, ADE20K_INSTANCE_HINT
    )
    out_json = os.path.join(ade_root, f"ade20k_instance_{split}.json")

    file_names = sorted(f for f in os.listdir(image_dir) if f.endswith(".jpg"))
    if not file_names:
        raise DatasetError(f"{image_dir!r} holds no .jpg images. {ADE20K_IMAGES_HINT}")
    images, annotations = [], []
    for i, file_name in enumerate(file_names):
        stem = os.path.splitext(file_name)[0]
        width, height = Image.open(os.path.join(image_dir, file_name)).size
        instance_file = require_file(
            os.path.join(instance_dir, stem + ".png"), _NAME, ADE20K_INSTANCE_HINT
        )
        instance = np.asarray(Image.open(instance_file).convert("RGB"))
        if instance.shape[:2] != (height, width):
            raise DatasetError(
                f"{instance_file}: size {instance.shape[1]}x{instance.shape[0]} differs from its "
                f"image's {width}x{height}."
            )
        images.append({"id": stem, "file_name": file_name, "width": width, "height": height})
        annotations += ade20k_to_instances(instance, stem, len(annotations) + 1, instance_file)
        if (i + 1) % 1000 == 0:
            logger.info(f"{split}: {i + 1}/{len(file_names)} images")

    categories = [{"id": c["id"], "name": c["name"]} for c in ADE20K_INSTANCE_CATEGORIES]
    with open(out_json, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    logger.info(f"Wrote {len(annotations)} instances of {len(images)} images to {out_json}")
    return out_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    splits = list(ADE20K_SPLIT_FOLDERS)
    parser.add_argument("--splits", nargs="+", choices=splits, default=splits)
    args = parser.parse_args()
    setup_logger(name="kmax_m2f")
    for split in args.splits:
        convert_ade20k_instance(os.path.join(datasets_root(), "ADEChallengeData2016"), split)


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
