"""COCO-Stuff-10K semantic segmentation: ``coco_2017_{train,test}_stuff_10k_sem_seg`` (9000 / 1000
images, 171 classes: COCO's 80 things and 91 stuff classes), the names the official Mask2Former
registration uses.

Labels are PNGs of contiguous class ids (0..170, 255 = unlabelled) in
``coco/coco_stuff_10k/annotations_detectron2/{train,test}``, next to the images in
``images_detectron2/{train,test}``, both made by ``datasets/prepare_coco_stuff_10k.py`` from the
official ``cocostuff-10k-v1.1.zip``.
"""
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .checks import datasets_root, require_dir

__all__ = ["COCO_STUFF_CATEGORIES", "register_all_coco_stuff_10k"]

# COCO-Stuff's stuff classes, ids 92..182 in order (cocostuff-labels.txt).
_STUFF_NAMES = (
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other "
    "ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence "
    "floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit "
    "furniture-other grass gravel ground-other hill house leaves light mat metal mirror-stuff moss "
    "mountain mud napkin net paper pavement pillow plant-other plastic platform playingfield "
    "railing railroad river road rock roof rug salad sand sea shelf sky-other skyscraper snow "
    "solid-other stairs stone straw structural-other table tent textile-other towel tree vegetable "
    "wall-brick wall-concrete wall-other wall-panel wall-stone wall-tile wall-wood water-other "
    "waterdrops window-blind window-other wood"
).split()
_FIRST_STUFF_ID = 92


def _stuff_colors(count: int) -> list[list[int]]:
    """Fixed colours for the stuff classes, which COCO's panoptic palette does not list."""
    rng = np.random.RandomState(182)
    return rng.randint(0, 256, size=(count, 3)).tolist()


# The 171 classes as (COCO id, name, colour), in contiguous-id order: things, then stuff.
COCO_STUFF_CATEGORIES: list[dict] = [
    {"id": c["id"], "name": c["name"], "color": c["color"], "isthing": 1} for c in COCO_CATEGORIES if c["isthing"]
] + [
    {"id": _FIRST_STUFF_ID + i, "name": name, "color": color, "isthing": 0}
    for i, (name, color) in enumerate(zip(_STUFF_NAMES, _stuff_colors(len(_STUFF_NAMES))))
]

_SPLITS = {"train": "train", "test": "test"}
_NAME = "coco_2017_{}_stuff_10k_sem_seg"
_HINT = "Create it with `python datasets/prepare_coco_stuff_10k.py` (see datasets/README.md, COCO-Stuff-10K)."


def _load(image_dir: str, gt_dir: str, name: str) -> list[dict]:
    require_dir(image_dir, name, _HINT)
    require_dir(gt_dir, name, _HINT)
    return load_sem_seg(gt_dir, image_dir, gt_ext="png", image_ext="jpg")


def register_all_coco_stuff_10k(root: str) -> None:
    """Register the two splits under ``root``/coco/coco_stuff_10k."""
    base = os.path.join(root, "coco", "coco_stuff_10k")
    for split, folder in _SPLITS.items():
        name = _NAME.format(split)
        image_dir = os.path.join(base, "images_detectron2", folder)
        gt_dir = os.path.join(base, "annotations_detectron2", folder)
        DatasetCatalog.register(name, lambda i=image_dir, g=gt_dir, n=name: _load(i, g, n))
        MetadataCatalog.get(name).set(
            image_root=image_dir,
            sem_seg_root=gt_dir,
            evaluator_type="sem_seg",
            ignore_label=255,
            stuff_classes=[c["name"] for c in COCO_STUFF_CATEGORIES],
            stuff_colors=[c["color"] for c in COCO_STUFF_CATEGORIES],
            stuff_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(COCO_STUFF_CATEGORIES)},
        )


register_all_coco_stuff_10k(datasets_root())
