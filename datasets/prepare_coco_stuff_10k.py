#!/usr/bin/env python3
"""Make detectron2-style semantic labels for COCO-Stuff-10K (171 classes).

Reads  $DETECTRON2_DATASETS/coco/coco_stuff_10k/{images,annotations,imageLists}, the extracted
       cocostuff-10k-v1.1.zip: images/*.jpg, annotations/*.mat (``S``: 0 = unlabelled, else the
       COCO class id 1..182), imageLists/{train,test}.txt
Writes $DETECTRON2_DATASETS/coco/coco_stuff_10k/images_detectron2/{train,test}/*.jpg (copies) and
       annotations_detectron2/{train,test}/*.png (contiguous ids 0..170, 255 = unlabelled), read
       by ``coco_2017_{train,test}_stuff_10k_sem_seg``.

Usage: python datasets/prepare_coco_stuff_10k.py
"""
import argparse
import logging
import os
import shutil
import sys

import numpy as np
import scipy.io
from detectron2.utils.logger import setup_logger
from PIL import Image

# Run as a script from a checkout: make the package importable without installing it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from kmax_m2f.data.datasets.checks import DatasetError, datasets_root, require_dir, require_file  # noqa: E402
from kmax_m2f.data.datasets.register_coco_stuff_10k import COCO_STUFF_CATEGORIES  # noqa: E402

logger = logging.getLogger("kmax_m2f.datasets.prepare_coco_stuff_10k")

SPLITS = ("train", "test")
_NAME = "COCO-Stuff-10K (prepare_coco_stuff_10k.py)"
_DOWNLOAD_HINT = (
    "Download cocostuff-10k-v1.1.zip (github.com/nightrome/cocostuff10k) and extract it into "
    "$DETECTRON2_DATASETS/coco/coco_stuff_10k."
)
_IGNORE = 255


def label_lookup() -> np.ndarray:
    """[256] uint8: COCO-Stuff label value -> contiguous id; 0 (unlabelled) and the ids COCO does
    not use -> 255 (the unused ones are rejected by :func:`to_detectron2_labels` first)."""
    lookup = np.full(256, _IGNORE, np.uint8)
    for contiguous_id, category in enumerate(COCO_STUFF_CATEGORIES):
        lookup[category["id"]] = contiguous_id
    return lookup


def to_detectron2_labels(label: np.ndarray, where: str) -> np.ndarray:
    """[H, W] COCO-Stuff class ids (0 = unlabelled) -> contiguous ids with 255 = unlabelled."""
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise DatasetError(f"{where}: 'S' should be a 2-D integer label map, got shape {label.shape}, type {label.dtype}.")
    valid = {0} | {c["id"] for c in COCO_STUFF_CATEGORIES}
    values = np.unique(label)
    unknown = [int(v) for v in values if int(v) not in valid]
    if unknown:
        raise DatasetError(
            f"{where}: label values {unknown[:10]} are not COCO-Stuff class ids (0 = unlabelled, 1..182 without "
            f"COCO's 11 unused thing ids). Is this cocostuff-10k-v1.1?"
        )
    return label_lookup()[label.astype(np.int64)]


def read_mat_labels(path: str) -> np.ndarray:
    """The ``S`` label map of one annotation .mat file."""
    try:
        mat = scipy.io.loadmat(path)
    except (scipy.io.matlab.MatReadError, ValueError, NotImplementedError, OSError) as e:
        raise DatasetError(f"{path}: cannot read it as a MATLAB file ({e}). Extract cocostuff-10k-v1.1.zip again.") from e
    if "S" not in mat:
        raise DatasetError(f"{path}: no 'S' label map (found {sorted(k for k in mat if not k.startswith('__'))}).")
    return mat["S"]


def convert_coco_stuff_10k(root: str, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Convert the given splits of ``root`` (the coco_stuff_10k folder); returns the label folders."""
    images = require_dir(os.path.join(root, "images"), _NAME, _DOWNLOAD_HINT)
    annotations = require_dir(os.path.join(root, "annotations"), _NAME, _DOWNLOAD_HINT)
    out_dirs = []
    for split in splits:
        list_file = require_file(os.path.join(root, "imageLists", f"{split}.txt"), _NAME, _DOWNLOAD_HINT)
        with open(list_file) as f:
            stems = [line.strip() for line in f if line.strip()]
        if not stems:
            raise DatasetError(f"{list_file} lists no images. {_DOWNLOAD_HINT}")
        image_out = os.path.join(root, "images_detectron2", split)
        label_out = os.path.join(root, "annotations_detectron2", split)
        os.makedirs(image_out, exist_ok=True)
        os.makedirs(label_out, exist_ok=True)
        for stem in stems:
            image_path = require_file(os.path.join(images, stem + ".jpg"), _NAME, f"It is listed in {list_file}.")
            mat_path = require_file(os.path.join(annotations, stem + ".mat"), _NAME, f"It is listed in {list_file}.")
            label = to_detectron2_labels(read_mat_labels(mat_path), mat_path)
            with Image.open(image_path) as image:
                if image.size != (label.shape[1], label.shape[0]):
                    raise DatasetError(
                        f"{mat_path}: label map {label.shape[1]}x{label.shape[0]} does not match {image_path} "
                        f"({image.size[0]}x{image.size[1]})."
                    )
            shutil.copyfile(image_path, os.path.join(image_out, stem + ".jpg"))
            Image.fromarray(label).save(os.path.join(label_out, stem + ".png"))
        logger.info("Wrote %d images and label PNGs to %s and %s", len(stems), image_out, label_out)
        out_dirs.append(label_out)
    return out_dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    args = parser.parse_args()
    setup_logger(name="kmax_m2f")
    convert_coco_stuff_10k(os.path.join(datasets_root(), "coco", "coco_stuff_10k"), tuple(args.splits))


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
