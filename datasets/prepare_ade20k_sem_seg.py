#!/usr/bin/env python3
"""Make detectron2-style semantic labels for ADE20K (SceneParsing, 150 classes).

Reads  $DETECTRON2_DATASETS/ADEChallengeData2016/annotations/{training,validation}/*.png
       (0 = void, 1..150 = classes)
Writes $DETECTRON2_DATASETS/ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png
       (0..149 = classes, 255 = void), read by ``ade20k_sem_seg_*`` and ``ade20k_panoptic_*``.

Usage: python datasets/prepare_ade20k_sem_seg.py
"""

import argparse
import logging
import os
import sys

import numpy as np
from PIL import Image
from detectron2.utils.logger import setup_logger

# Run as a script from a checkout: make the package importable without installing it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from kmax_m2f.data.datasets.checks import DatasetError, datasets_root, require_dir  # noqa: E402

logger = logging.getLogger("kmax_m2f.datasets.prepare_ade20k_sem_seg")

SPLITS = ("training", "validation")
_NAME = "ADE20K (prepare_ade20k_sem_seg.py)"
_DOWNLOAD_HINT = (
    "Download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and extract it "
    "into $DETECTRON2_DATASETS."
)


def to_detectron2_labels(label: np.ndarray, where: str) -> np.ndarray:
    """Shift ADE20K's labels down by one; the uint8 wrap-around turns void (0) into 255."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise DatasetError(
            f"{where}: expected a single-channel 8-bit label PNG, got an array of shape "
            f"{label.shape} and type {label.dtype}. Is this the SceneParsing 'annotations' folder?"
        )
    if label.max() > 150:
        raise DatasetError(
            f"{where}: label {label.max()} is out of ADE20K's range 0..150. Is this the "
            f"SceneParsing (150-class) 'annotations' folder?"
        )
    return label - np.uint8(1)


def convert_ade20k_sem_seg(ade_root: str, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Convert the given splits of ``ade_root`` (the ADEChallengeData2016 folder); returns the
    output folders."""
    out_dirs = []
    for split in splits:
        in_dir = require_dir(os.path.join(ade_root, "annotations", split), _NAME, _DOWNLOAD_HINT)
        out_dir = os.path.join(ade_root, "annotations_detectron2", split)
        os.makedirs(out_dir, exist_ok=True)
        files = sorted(f for f in os.listdir(in_dir) if f.endswith(".png"))
        if not files:
            raise DatasetError(f"{in_dir!r} holds no .png label files. {_DOWNLOAD_HINT}")
        for file in files:
            path = os.path.join(in_dir, file)
            label = to_detectron2_labels(np.asarray(Image.open(path)), path)
            Image.fromarray(label).save(os.path.join(out_dir, file))
        logger.info(f"Wrote {len(files)} label PNGs to {out_dir}")
        out_dirs.append(out_dir)
    return out_dirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    args = parser.parse_args()
    setup_logger(name="kmax_m2f")
    convert_ade20k_sem_seg(
        os.path.join(datasets_root(), "ADEChallengeData2016"), tuple(args.splits)
    )


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
