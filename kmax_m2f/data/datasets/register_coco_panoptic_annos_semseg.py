"""COCO panoptic with per-pixel semantic labels: ``coco_2017_{train,val}_panoptic_with_sem_seg``.

The names, folders and metadata follow the official Mask2Former registration, so its configs
(``DATASETS.TRAIN: ("coco_2017_train_panoptic_with_sem_seg",)``) work unchanged. Each record is a
detectron2 panoptic record plus ``sem_seg_file_name``, a PNG of contiguous class ids (255 = void)
in ``coco/panoptic_semseg_{train,val}2017`` made by
``datasets/prepare_coco_semantic_annos_from_panoptic.py``.

The loader and metadata helpers here are shared with the ADE20K panoptic registration.
"""

import logging
import os
from typing import Any, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .checks import DatasetError, datasets_root, load_json, require_dir, require_keys, require_listed_files

logger = logging.getLogger(__name__)

__all__ = [
    "get_panoptic_metadata",
    "load_panoptic_json_with_sem_seg",
    "register_coco_panoptic_annos_sem_seg",
    "register_panoptic_with_sem_seg",
    "register_all_coco_panoptic_annos_sem_seg",
]

# name prefix -> (image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json),
# relative to the datasets root. The registered name is the prefix + "_with_sem_seg".
_PREDEFINED_SPLITS_COCO_PANOPTIC = {
    "coco_2017_train_panoptic": (
        "coco/train2017",
        "coco/panoptic_train2017",
        "coco/annotations/panoptic_train2017.json",
        "coco/panoptic_semseg_train2017",
        "coco/annotations/instances_train2017.json",
    ),
    "coco_2017_val_panoptic": (
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/panoptic_val2017.json",
        "coco/panoptic_semseg_val2017",
        "coco/annotations/instances_val2017.json",
    ),
}

_COCO_SEM_SEG_HINT = (
    "Create it with `python datasets/prepare_coco_semantic_annos_from_panoptic.py`."
)


def get_panoptic_metadata(categories: Sequence[dict]) -> dict[str, Any]:
    """Metadata of a panoptic dataset whose classes are ``categories`` (dicts with "id", "name",
    "color", "isthing"), laid out as Mask2Former expects.

    Every class gets the contiguous id of its position in ``categories``; ``stuff_*`` lists all
    classes (things too) and ``stuff_dataset_id_to_contiguous_id`` maps every class, so that the
    semantic-segmentation evaluator scores all of them, while ``thing_*`` lists only the things
    (for the instance evaluator and the visualizer).
    """
    return {
        "thing_classes": [c["name"] for c in categories if c["isthing"]],
        "thing_colors": [c["color"] for c in categories if c["isthing"]],
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [c["color"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def load_panoptic_json_with_sem_seg(
    json_file: str,
    image_dir: str,
    gt_dir: str,
    semseg_dir: str,
    meta: dict[str, Any],
    dataset_name: str,
    panoptic_hint: str = "",
    sem_seg_hint: str = "",
    image_hint: str = "",
) -> list[dict]:
    """Read a COCO-format panoptic dataset whose semantic PNGs sit in ``semseg_dir``.

    Records have ``file_name`` (``image_dir/<stem>.jpg``), ``image_id`` (as in the JSON: an int
    for COCO, a string for ADE20K), ``pan_seg_file_name``, ``sem_seg_file_name`` (same name as the
    panoptic PNG) and ``segments_info`` with contiguous ``category_id`` and ``isthing``.

    detectron2's ``load_coco_panoptic_json`` is not reused because it casts ``image_id`` to int
    (ADE20K's ids are file stems) and knows no semantic files.

    Args:
        meta: holds ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id``
            (see :func:`get_panoptic_metadata`).
        dataset_name: used in error messages.
        panoptic_hint, sem_seg_hint, image_hint: how to create missing panoptic / semantic /
            image files.
    """
    require_dir(image_dir, dataset_name, image_hint)
    require_dir(gt_dir, dataset_name, panoptic_hint)
    require_dir(semseg_dir, dataset_name, sem_seg_hint)
    json_info = load_json(json_file, dataset_name)
    where = f"Dataset '{dataset_name}': {json_file!r}"
    require_keys(json_info, ["annotations"], where)
    thing_ids = meta["thing_dataset_id_to_contiguous_id"]
    stuff_ids = meta["stuff_dataset_id_to_contiguous_id"]

    records = []
    for ann in json_info["annotations"]:
        require_keys(
            ann, ["image_id", "file_name", "segments_info"], f"An annotation in {json_file!r}"
        )
        segments_info = []
        for segment in ann["segments_info"]:
            require_keys(
                segment, ["id", "category_id"], f"A segment of {ann['file_name']} in {json_file!r}"
            )
            dataset_id = segment["category_id"]
            if dataset_id not in stuff_ids:
                raise DatasetError(
                    f"{where}: segment {segment['id']} of {ann['file_name']} has category_id "
                    f"{dataset_id}, which is not one of the dataset's {len(stuff_ids)} classes. "
                    f"The JSON was made for another category list: re-create it with "
                    f"datasets/prepare_*.py."
                )
            isthing = dataset_id in thing_ids
            segments_info.append(
                dict(
                    segment,
                    category_id=thing_ids[dataset_id] if isthing else stuff_ids[dataset_id],
                    isthing=isthing,
                )
            )
        stem = os.path.splitext(ann["file_name"])[0]
        records.append(
            {
                "file_name": os.path.join(image_dir, stem + ".jpg"),
                "image_id": ann["image_id"],
                "pan_seg_file_name": os.path.join(gt_dir, ann["file_name"]),
                "sem_seg_file_name": os.path.join(semseg_dir, ann["file_name"]),
                "segments_info": segments_info,
            }
        )
    if not records:
        raise DatasetError(f"{where} has no annotations: the file is empty or truncated.")

    require_listed_files([r["file_name"] for r in records], dataset_name, json_file, image_hint)
    require_listed_files(
        [r["pan_seg_file_name"] for r in records], dataset_name, json_file, panoptic_hint
    )
    require_listed_files(
        [r["sem_seg_file_name"] for r in records], dataset_name, json_file, sem_seg_hint
    )
    logger.info(f"Loaded {len(records)} images with panoptic and semantic labels from {json_file}")
    return records


def register_panoptic_with_sem_seg(
    name: str,
    metadata: dict[str, Any],
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: str,
    instances_json: Optional[str],
    evaluator_type: str,
    **hints: str,
) -> None:
    """Register a COCO-format panoptic dataset whose records carry ``sem_seg_file_name`` (the
    layout Mask2Former's evaluators expect), lazily: missing files are reported on
    ``DatasetCatalog.get``. ``hints`` (panoptic_hint, sem_seg_hint, image_hint) say how to
    create missing files."""
    DatasetCatalog.register(
        name,
        lambda: load_panoptic_json_with_sem_seg(
            panoptic_json, image_root, panoptic_root, sem_seg_root, metadata, name, **hints
        ),
    )
    MetadataCatalog.get(name).set(
        sem_seg_root=sem_seg_root,
        panoptic_root=panoptic_root,
        image_root=image_root,
        panoptic_json=panoptic_json,
        json_file=instances_json,
        evaluator_type=evaluator_type,
        ignore_label=255,
        label_divisor=1000,
        **metadata,
    )


def register_coco_panoptic_annos_sem_seg(
    name: str,
    metadata: dict[str, Any],
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: str,
    instances_json: str,
) -> None:
    """Register ``name + "_with_sem_seg"``, e.g. "coco_2017_train_panoptic_with_sem_seg".

    Nothing is read until ``DatasetCatalog.get`` is called; missing files are reported then.
    """
    register_panoptic_with_sem_seg(
        name + "_with_sem_seg", metadata, image_root, panoptic_root, panoptic_json, sem_seg_root,
        instances_json, "coco_panoptic_seg", sem_seg_hint=_COCO_SEM_SEG_HINT,
    )


def register_all_coco_panoptic_annos_sem_seg(root: str) -> None:
    """Register the COCO 2017 ``*_panoptic_with_sem_seg`` splits with files under ``root``."""
    metadata = get_panoptic_metadata(COCO_CATEGORIES)
    for prefix, (
        image_root,
        panoptic_root,
        panoptic_json,
        sem_seg_root,
        instances_json,
    ) in _PREDEFINED_SPLITS_COCO_PANOPTIC.items():
        register_coco_panoptic_annos_sem_seg(
            prefix,
            metadata,
            os.path.join(root, image_root),
            os.path.join(root, panoptic_root),
            os.path.join(root, panoptic_json),
            os.path.join(root, sem_seg_root),
            os.path.join(root, instances_json),
        )


register_all_coco_panoptic_annos_sem_seg(datasets_root())
