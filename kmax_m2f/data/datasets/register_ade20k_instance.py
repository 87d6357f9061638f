"""ADE20K instance segmentation (100 thing classes): ``ade20k_instance_{train,val}``.

COCO-format JSON files ``ADEChallengeData2016/ade20k_instance_{train,val}.json`` made by
``datasets/prepare_ade20k_ins_seg.py``, read with detectron2's ``load_coco_json`` and evaluated
with the COCO evaluator, as in the official Mask2Former.
"""

import os
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from .checks import datasets_root, json_file_errors, require_dir, require_file, require_listed_files

__all__ = [
    "ADE20K_INSTANCE_CATEGORIES",
    "get_ade20k_instance_metadata",
    "load_ade20k_instance_json",
    "register_ade20k_instance",
    "register_all_ade20k_instance",
]

# The 100 instance classes of the ADE20K instance challenge. "id" is the class's index in the
# 150-class SceneParsing list (ADE20K_150_CATEGORIES), which the instance and panoptic JSONs share.
# The order is that of the instance challenge: the class written as k (1..100) in the red channel
# of annotations_instance/*.png is ADE20K_INSTANCE_CATEGORIES[k - 1].
ADE20K_INSTANCE_CATEGORIES = [
    {"id": 7, "name": "bed"},
    {"id": 8, "name": "windowpane"},
    {"id": 10, "name": "cabinet"},
    {"id": 12, "name": "person"},
    {"id": 14, "name": "door"},
    {"id": 15, "name": "table"},
    {"id": 18, "name": "curtain"},
    {"id": 19, "name": "chair"},
    {"id": 20, "name": "car"},
    {"id": 22, "name": "painting"},
    {"id": 23, "name": "sofa"},
    {"id": 24, "name": "shelf"},
    {"id": 27, "name": "mirror"},
    {"id": 30, "name": "armchair"},
    {"id": 31, "name": "seat"},
    {"id": 32, "name": "fence"},
    {"id": 33, "name": "desk"},
    {"id": 35, "name": "wardrobe"},
    {"id": 36, "name": "lamp"},
    {"id": 37, "name": "bathtub"},
    {"id": 38, "name": "railing"},
    {"id": 39, "name": "cushion"},
    {"id": 41, "name": "box"},
    {"id": 42, "name": "column"},
    {"id": 43, "name": "signboard"},
    {"id": 44, "name": "chest of drawers"},
    {"id": 45, "name": "counter"},
    {"id": 47, "name": "sink"},
    {"id": 49, "name": "fireplace"},
    {"id": 50, "name": "refrigerator"},
    {"id": 53, "name": "stairs"},
    {"id": 55, "name": "case"},
    {"id": 56, "name": "pool table"},
    {"id": 57, "name": "pillow"},
    {"id": 58, "name": "screen door"},
    {"id": 62, "name": "bookcase"},
    {"id": 64, "name": "coffee table"},
    {"id": 65, "name": "toilet"},
    {"id": 66, "name": "flower"},
    {"id": 67, "name": "book"},
    {"id": 69, "name": "bench"},
    {"id": 70, "name": "countertop"},
    {"id": 71, "name": "stove"},
    {"id": 72, "name": "palm"},
    {"id": 73, "name": "kitchen island"},
    {"id": 74, "name": "computer"},
    {"id": 75, "name": "swivel chair"},
    {"id": 76, "name": "boat"},
    {"id": 78, "name": "arcade machine"},
    {"id": 80, "name": "bus"},
    {"id": 81, "name": "towel"},
    {"id": 82, "name": "light"},
    {"id": 83, "name": "truck"},
    {"id": 85, "name": "chandelier"},
    {"id": 86, "name": "awning"},
    {"id": 87, "name": "streetlight"},
    {"id": 88, "name": "booth"},
    {"id": 89, "name": "television receiver"},
    {"id": 90, "name": "airplane"},
    {"id": 92, "name": "apparel"},
    {"id": 93, "name": "pole"},
    {"id": 95, "name": "bannister"},
    {"id": 97, "name": "ottoman"},
    {"id": 98, "name": "bottle"},
    {"id": 102, "name": "van"},
    {"id": 103, "name": "ship"},
    {"id": 104, "name": "fountain"},
    {"id": 107, "name": "washer"},
    {"id": 108, "name": "plaything"},
    {"id": 110, "name": "stool"},
    {"id": 111, "name": "barrel"},
    {"id": 112, "name": "basket"},
    {"id": 115, "name": "bag"},
    {"id": 116, "name": "minibike"},
    {"id": 118, "name": "oven"},
    {"id": 119, "name": "ball"},
    {"id": 120, "name": "food"},
    {"id": 121, "name": "step"},
    {"id": 123, "name": "trade name"},
    {"id": 124, "name": "microwave"},
    {"id": 125, "name": "pot"},
    {"id": 126, "name": "animal"},
    {"id": 127, "name": "bicycle"},
    {"id": 129, "name": "dishwasher"},
    {"id": 130, "name": "screen"},
    {"id": 132, "name": "sculpture"},
    {"id": 133, "name": "hood"},
    {"id": 134, "name": "sconce"},
    {"id": 135, "name": "vase"},
    {"id": 136, "name": "traffic light"},
    {"id": 137, "name": "tray"},
    {"id": 138, "name": "ashcan"},
    {"id": 139, "name": "fan"},
    {"id": 142, "name": "plate"},
    {"id": 143, "name": "monitor"},
    {"id": 144, "name": "bulletin board"},
    {"id": 146, "name": "radiator"},
    {"id": 147, "name": "glass"},
    {"id": 148, "name": "clock"},
    {"id": 149, "name": "flag"},
]

# name -> (image_root, json_file), relative to the datasets root.
# ADE20K's split folders and where its downloads come from, shared by the converters.
ADE20K_SPLIT_FOLDERS = {"train": "training", "val": "validation"}
ADE20K_IMAGES_HINT = (
    "Download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and extract it "
    "into $DETECTRON2_DATASETS."
)
ADE20K_INSTANCE_HINT = (
    "Download the instance annotations (http://sceneparsing.csail.mit.edu/data/ChallengeData2017/"
    "annotations_instance.tar) and extract them into ADEChallengeData2016/."
)

_PREDEFINED_SPLITS_ADE20K_INSTANCE = {
    "ade20k_instance_train": (
        "ADEChallengeData2016/images/training",
        "ADEChallengeData2016/ade20k_instance_train.json",
    ),
    "ade20k_instance_val": (
        "ADEChallengeData2016/images/validation",
        "ADEChallengeData2016/ade20k_instance_val.json",
    ),
}

_JSON_HINT = "Create it with `python datasets/prepare_ade20k_ins_seg.py`."


def get_ade20k_instance_metadata() -> dict[str, Any]:
    """Thing classes and the map from the JSON's (150-class) ids to contiguous ids in [0, 100)."""
    return {
        "thing_classes": [c["name"] for c in ADE20K_INSTANCE_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(ADE20K_INSTANCE_CATEGORIES)
        },
    }


def load_ade20k_instance_json(json_file: str, image_root: str, dataset_name: str) -> list[dict]:
    """detectron2's ``load_coco_json`` with errors that name the missing or corrupt file."""
    require_dir(image_root, dataset_name)
    require_file(json_file, dataset_name, _JSON_HINT)
    with json_file_errors(json_file, dataset_name):
        records = load_coco_json(json_file, image_root, dataset_name)
    require_listed_files([r["file_name"] for r in records], dataset_name, json_file)
    return records


def register_ade20k_instance(
    name: str, metadata: dict[str, Any], json_file: str, image_root: str
) -> None:
    """Register a COCO-format ADE20K instance split; what ``register_coco_instances`` does, with
    the checked loader. Nothing is read until ``DatasetCatalog.get``."""
    DatasetCatalog.register(name, lambda: load_ade20k_instance_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )


def register_all_ade20k_instance(root: str) -> None:
    """Register ``ade20k_instance_{train,val}`` with files under ``root``."""
    for name, (image_root, json_file) in _PREDEFINED_SPLITS_ADE20K_INSTANCE.items():
        register_ade20k_instance(
            name,
            get_ade20k_instance_metadata(),
            os.path.join(root, json_file),
            os.path.join(root, image_root),
        )


register_all_ade20k_instance(datasets_root())
