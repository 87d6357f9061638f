"""Catalog entries of the synthetic panoptic dataset (see kmax_m2f.data.synthetic_generator).

Registered the way detectron2 / Mask2Former register COCO, so their evaluators run unchanged:

- ``synthetic_panoptic_{train,val}``: panoptic records with semantic labels (COCOPanopticEvaluator,
  SemSegEvaluator), contiguous ids over all 8 categories (things first);
- ``synthetic_sem_seg_{train,val}``: semantic records (SemSegEvaluator);
- ``synthetic_instance_{train,val}``: COCO instances of the 5 thing classes (COCOEvaluator).
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg

from ..synthetic_generator import IGNORE_LABEL, SYNTHETIC_CATEGORIES
from .checks import datasets_root, json_file_errors, require_dir
from .register_coco_panoptic_annos_semseg import get_panoptic_metadata, register_panoptic_with_sem_seg

SPLITS = ("train", "val")
GENERATE_HINT = "Generate it with `python datasets/prepare_synthetic.py`."


def synthetic_metadata() -> dict:
    """Mask2Former's metadata layout over the 8 synthetic categories (contiguous ids 0..7)."""
    return get_panoptic_metadata(SYNTHETIC_CATEGORIES)


def load_synthetic_instances(json_file: str, image_root: str, dataset_name: str) -> list[dict]:
    """COCO instance records via detectron2's ``load_coco_json`` (which also fills the thing
    classes and id map into the metadata)."""
    require_dir(image_root, dataset_name, GENERATE_HINT)
    with json_file_errors(json_file, dataset_name):
        return load_coco_json(json_file, image_root, dataset_name)


def register_synthetic(root: str, prefix: str = "synthetic") -> None:
    """Register the six synthetic datasets found (lazily) under ``root``."""
    metadata = synthetic_metadata()
    for split in SPLITS:
        image_root = os.path.join(root, split)
        register_panoptic_with_sem_seg(
            f"{prefix}_panoptic_{split}",
            metadata,
            image_root,
            os.path.join(root, f"panoptic_{split}"),
            os.path.join(root, "annotations", f"panoptic_{split}.json"),
            os.path.join(root, f"panoptic_semseg_{split}"),
            os.path.join(root, "annotations", f"instances_{split}.json"),
            "coco_panoptic_seg",
            panoptic_hint=GENERATE_HINT,
            sem_seg_hint=GENERATE_HINT,
            image_hint=GENERATE_HINT,
        )

        sem_seg_name = f"{prefix}_sem_seg_{split}"
        semseg_root = os.path.join(root, f"panoptic_semseg_{split}")
        DatasetCatalog.register(
            sem_seg_name,
            lambda image_root=image_root, semseg_root=semseg_root, name=sem_seg_name: load_sem_seg(
                require_dir(semseg_root, name, GENERATE_HINT),
                require_dir(image_root, name, GENERATE_HINT),
                gt_ext="png",
                image_ext="jpg",
            ),
        )
        MetadataCatalog.get(sem_seg_name).set(
            image_root=image_root,
            sem_seg_root=semseg_root,
            evaluator_type="sem_seg",
            ignore_label=IGNORE_LABEL,
            stuff_classes=metadata["stuff_classes"],
            stuff_colors=metadata["stuff_colors"],
            stuff_dataset_id_to_contiguous_id=metadata["stuff_dataset_id_to_contiguous_id"],
        )

        instance_name = f"{prefix}_instance_{split}"
        instances_json = os.path.join(root, "annotations", f"instances_{split}.json")
        DatasetCatalog.register(
            instance_name,
            lambda json_file=instances_json, image_root=image_root, name=instance_name: load_synthetic_instances(
                json_file, image_root, name
            ),
        )
        MetadataCatalog.get(instance_name).set(json_file=instances_json, image_root=image_root, evaluator_type="coco")


register_synthetic(os.path.join(datasets_root(), "synthetic"))
