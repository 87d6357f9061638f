#!/usr/bin/env python3
"""Make semantic labels for COCO from its panoptic annotations (133 classes).

Reads  $DETECTRON2_DATASETS/coco/annotations/panoptic_{train,val}2017.json
       $DETECTRON2_DATASETS/coco/panoptic_{train,val}2017/*.png
Writes $DETECTRON2_DATASETS/coco/panoptic_semseg_{train,val}2017/*.png: each pixel holds the
       contiguous id (0..132, the position in detectron2's COCO_CATEGORIES) of its segment's
       class, things and stuff alike; 255 where no segment is. Read by
       ``coco_2017_*_panoptic_with_sem_seg``.

(The official Mask2Former names this script prepare_coco_semantic_annos_from_panoptic_annos.py.
detectron2's prepare_panoptic_fpn.py makes a different, stuff-only labelling.)

Usage: python datasets/prepare_coco_semantic_annos_from_panoptic.py [--workers N]
"""

import argparse
import functools
import logging
import multiprocessing as mp
import os
import sys
import time
from typing import Sequence

import numpy as np
from panopticapi.utils import rgb2id
from PIL import Image
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.utils.logger import setup_logger

# Run as a script from a checkout: make the package importable without installing it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from kmax_m2f.data.datasets.checks import (  # noqa: E402
    DatasetError,
    datasets_root,
    load_json,
    require_dir,
    require_keys,
    require_listed_files,
)

logger = logging.getLogger("kmax_m2f.datasets.prepare_coco_semantic_annos_from_panoptic")

SPLITS = ("val2017", "train2017")
IGNORE_LABEL = 255
_NAME = "COCO panoptic (prepare_coco_semantic_annos_from_panoptic.py)"
_DOWNLOAD_HINT = (
    "Download panoptic_annotations_trainval2017.zip from https://cocodataset.org/#download and "
    "extract it, and the panoptic_{train,val}2017.zip inside it, into coco/annotations and coco/."
)


def panoptic_to_semantic(
    panoptic: np.ndarray, segments_info: list[dict], id_map: dict[int, int], where: str
) -> np.ndarray:
    """The semantic label (HxW uint8) of one panoptic PNG (HxWx3 uint8, ids as panopticapi's
    id2rgb). Raises if the PNG holds a segment id that ``segments_info`` does not list."""
    ids = rgb2id(panoptic)
    unique_ids, inverse = np.unique(ids, return_inverse=True)
    label_of = {s["id"]: id_map[s["category_id"]] for s in segments_info}
    label_of[0] = IGNORE_LABEL  # VOID in the COCO panoptic format
    unknown = [int(i) for i in unique_ids if int(i) not in label_of]
    if unknown:
        raise DatasetError(
            f"{where}: segment ids {unknown[:10]} occur in the PNG but not in its segments_info. "
            f"The PNG and the JSON do not belong together: take both from the same release."
        )
    labels = np.array([label_of[int(i)] for i in unique_ids], dtype=np.uint8)
    return labels[inverse].reshape(ids.shape)


def _convert_file(
    panoptic_file: str, semantic_file: str, segments_info: list[dict], id_map: dict[int, int]
) -> None:
    panoptic = np.asarray(Image.open(panoptic_file).convert("RGB"))
    semantic = panoptic_to_semantic(panoptic, segments_info, id_map, panoptic_file)
    Image.fromarray(semantic).save(semantic_file)


def convert_coco_panoptic_to_semantic(
    panoptic_json: str,
    panoptic_root: str,
    sem_seg_root: str,
    categories: Sequence[dict] = COCO_CATEGORIES,
    workers: int = 1,
) -> int:
    """Write one semantic PNG into ``sem_seg_root`` per annotation of ``panoptic_json``; the class
    of category ``categories[i]["id"]`` becomes ``i``. ``workers`` > 1 converts in that many
    processes. Returns the number of files written."""
    if len(categories) >= IGNORE_LABEL:
        raise ValueError(f"{len(categories)} classes do not fit below the ignore label 255.")
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    require_dir(panoptic_root, _NAME, _DOWNLOAD_HINT)
    annotations = load_json(panoptic_json, _NAME)
    require_keys(annotations, ["annotations"], panoptic_json)
    # Check the JSON before starting: a wrong category list should fail in one clear message,
    # not in a worker after an hour.
    jobs = []
    for ann in annotations["annotations"]:
        require_keys(ann, ["file_name", "segments_info"], f"An annotation in {panoptic_json!r}")
        for segment in ann["segments_info"]:
            require_keys(segment, ["id", "category_id"], f"A segment of {ann['file_name']}")
            if segment["category_id"] not in id_map:
                raise DatasetError(
                    f"{panoptic_json!r}: segment {segment['id']} of {ann['file_name']} has "
                    f"category_id {segment['category_id']}, not one of the {len(id_map)} known "
                    f"classes. Is this a COCO panoptic JSON?"
                )
        jobs.append(
            (
                os.path.join(panoptic_root, ann["file_name"]),
                os.path.join(sem_seg_root, ann["file_name"]),
                ann["segments_info"],
            )
        )
    require_listed_files([job[0] for job in jobs], _NAME, panoptic_json, _DOWNLOAD_HINT)
    os.makedirs(sem_seg_root, exist_ok=True)

    start = time.perf_counter()
    convert = functools.partial(_convert_file, id_map=id_map)
    if workers > 1:
        with mp.Pool(processes=workers) as pool:
            pool.starmap(convert, jobs, chunksize=64)
    else:
        for job in jobs:
            convert(*job)
    logger.info(
        f"Wrote {len(jobs)} semantic PNGs to {sem_seg_root} in {time.perf_counter() - start:.1f}s"
    )
    return len(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="processes (1: no multiprocessing)"
    )
    args = parser.parse_args()
    setup_logger(name="kmax_m2f")
    coco = os.path.join(datasets_root(), "coco")
    for split in args.splits:
        convert_coco_panoptic_to_semantic(
            os.path.join(coco, "annotations", f"panoptic_{split}.json"),
            os.path.join(coco, f"panoptic_{split}"),
            os.path.join(coco, f"panoptic_semseg_{split}"),
            workers=args.workers,
        )


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
