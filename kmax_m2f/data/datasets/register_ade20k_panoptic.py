"""ADE20K panoptic segmentation (150 classes, 100 of them things): ``ade20k_panoptic_{train,val}``.

Panoptic PNGs + JSON made by ``datasets/prepare_ade20k_pan_seg.py`` and the semantic labels in
``annotations_detectron2`` made by ``datasets/prepare_ade20k_sem_seg.py``; each record has both, as
in the official Mask2Former registration (names, folders and metadata match it). Importing this
module also gives detectron2's ``ade20k_sem_seg_{train,val}`` their ``stuff_colors``.
"""

import os
from typing import Any, Optional

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .checks import datasets_root
from .register_ade20k_instance import ADE20K_INSTANCE_CATEGORIES
from .register_coco_panoptic_annos_semseg import (
    get_panoptic_metadata,
    register_panoptic_with_sem_seg,
)

__all__ = [
    "ADE20K_150_CATEGORIES",
    "get_ade20k_panoptic_metadata",
    "register_ade20k_panoptic",
    "register_all_ade20k_panoptic",
]

# Colours of the 150 SceneParsing classes in class order, as in the official Mask2Former metadata
# (which gives "road" and "skyscraper" the same colour).
# fmt: off
_ADE20K_150_COLORS = [
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
    [120, 120, 80], [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7],
    [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70], [8, 255, 51],
    [255, 6, 82], [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
    [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255], [255, 7, 71],
    [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10],
    [7, 255, 255], [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
    [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153], [6, 51, 255],
    [235, 12, 255], [160, 150, 20], [0, 163, 255], [140, 140, 140], [250, 10, 15],
    [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0], [153, 255, 0],
    [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112],
    [0, 255, 133], [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0],
    [0, 143, 255], [51, 255, 0], [0, 82, 255], [0, 255, 41], [0, 255, 173],
    [10, 0, 255], [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
    [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20], [255, 184, 184],
    [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255],
    [0, 122, 255], [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
    [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0], [8, 184, 170],
    [133, 0, 255], [0, 255, 92], [184, 0, 255], [255, 0, 31], [0, 184, 255],
    [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255], [112, 224, 255],
    [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235],
    [245, 0, 255], [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0],
    [0, 204, 255], [20, 0, 255], [255, 255, 0], [0, 153, 255], [0, 41, 255],
    [0, 255, 204], [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
    [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255], [184, 255, 0],
    [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
]
# fmt: on

# The panoptic classes: the 150 SceneParsing classes (names from detectron2), ids 0..149; a class
# is a thing exactly when it is one of the 100 instance-challenge classes.
_THING_IDS = {c["id"] for c in ADE20K_INSTANCE_CATEGORIES}
ADE20K_150_CATEGORIES = [
    {"color": color, "id": i, "isthing": int(i in _THING_IDS), "name": name}
    for i, (name, color) in enumerate(zip(ADE20K_SEM_SEG_CATEGORIES, _ADE20K_150_COLORS))
]

# name -> (image_root, panoptic_root, panoptic_json, semantic_root, instances_json),
# relative to the datasets root.
_PREDEFINED_SPLITS_ADE20K_PANOPTIC = {
    "ade20k_panoptic_train": (
        "ADEChallengeData2016/images/training",
        "ADEChallengeData2016/ade20k_panoptic_train",
        "ADEChallengeData2016/ade20k_panoptic_train.json",
        "ADEChallengeData2016/annotations_detectron2/training",
        "ADEChallengeData2016/ade20k_instance_train.json",
    ),
    "ade20k_panoptic_val": (
        "ADEChallengeData2016/images/validation",
        "ADEChallengeData2016/ade20k_panoptic_val",
        "ADEChallengeData2016/ade20k_panoptic_val.json",
        "ADEChallengeData2016/annotations_detectron2/validation",
        "ADEChallengeData2016/ade20k_instance_val.json",
    ),
}

_PANOPTIC_HINT = "Create it with `python datasets/prepare_ade20k_pan_seg.py`."
_SEM_SEG_HINT = "Create it with `python datasets/prepare_ade20k_sem_seg.py`."


def get_ade20k_panoptic_metadata() -> dict[str, Any]:
    """Class names, colours and id maps of ADE20K panoptic (see ``get_panoptic_metadata``)."""
    return get_panoptic_metadata(ADE20K_150_CATEGORIES)


def register_ade20k_panoptic(
    name: str,
    metadata: dict[str, Any],
    image_root: str,
    panoptic_root: str,
    semantic_root: str,
    panoptic_json: str,
    instances_json: Optional[str] = None,
) -> None:
    """Register an ADE20K panoptic split whose records also carry ``sem_seg_file_name``.

    Args:
        name: e.g. "ade20k_panoptic_train".
        metadata: from :func:`get_ade20k_panoptic_metadata`.
        image_root: folder of the .jpg images.
        panoptic_root, panoptic_json: COCO-format panoptic PNGs and their JSON.
        semantic_root: folder of semantic PNGs with ids 0..149, 255 = void.
        instances_json: COCO-format instance JSON, used by the instance evaluator.

    Nothing is read until ``DatasetCatalog.get``; missing files are reported then.
    """
    register_panoptic_with_sem_seg(
        name, metadata, image_root, panoptic_root, panoptic_json, semantic_root, instances_json,
        "ade20k_panoptic_seg", panoptic_hint=_PANOPTIC_HINT, sem_seg_hint=_SEM_SEG_HINT,
    )


def register_all_ade20k_panoptic(root: str) -> None:
    """Register ``ade20k_panoptic_{train,val}`` with files under ``root``."""
    metadata = get_ade20k_panoptic_metadata()
    for name, (
        image_root,
        panoptic_root,
        panoptic_json,
        semantic_root,
        instances_json,
    ) in _PREDEFINED_SPLITS_ADE20K_PANOPTIC.items():
        register_ade20k_panoptic(
            name,
            metadata,
            os.path.join(root, image_root),
            os.path.join(root, panoptic_root),
            os.path.join(root, semantic_root),
            os.path.join(root, panoptic_json),
            os.path.join(root, instances_json),
        )


def _add_ade20k_sem_seg_colors() -> None:
    """detectron2 registers ``ade20k_sem_seg_*`` without colours; the visualizer wants them."""
    for name in ("ade20k_sem_seg_train", "ade20k_sem_seg_val"):
        MetadataCatalog.get(name).set(stuff_colors=[c["color"] for c in ADE20K_150_CATEGORIES])


_add_ade20k_sem_seg_colors()
register_all_ade20k_panoptic(datasets_root())
