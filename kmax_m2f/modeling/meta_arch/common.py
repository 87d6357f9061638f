"""Checks and metadata lookups shared by the meta-architectures."""
from typing import Optional

from detectron2.data import MetadataCatalog

# The tasks a meta-architecture can declare in ``output_tasks(cfg)``; the evaluators are chosen
# by them (kmax_m2f.evaluation.build). LOCALIZATION (LOCA's pre-training task: where query
# patches sit in a reference view) needs no labels and is evaluated on any dataset's images.
SEMANTIC, INSTANCE, PANOPTIC, REFER = "semantic", "instance", "panoptic", "refer"
LOCALIZATION = "localization"


def check_num_classes(cfg) -> None:
    """A NUM_CLASSES that disagrees with the training set's metadata trains a wrong class head
    silently; say so before any compute is spent."""
    if not cfg.DATASETS.TRAIN:
        return
    dataset = cfg.DATASETS.TRAIN[0]
    metadata = MetadataCatalog.get(dataset)
    classes = metadata.get("stuff_classes") or metadata.get("thing_classes")
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if classes and len(classes) != num_classes:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes}, but dataset '{dataset}' has "
            f"{len(classes)} classes. Set MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(classes)}."
        )


def training_metadata(cfg):
    """Metadata of the first training set (class names, thing ids), or None without one."""
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None


def thing_ids(metadata: Optional[object]) -> set[int]:
    """Contiguous ids of the thing classes, which panoptic / instance inference needs."""
    if metadata is None or not metadata.get("thing_dataset_id_to_contiguous_id"):
        raise ValueError(
            "Panoptic / instance inference needs the training set's thing classes: set "
            "DATASETS.TRAIN to a dataset whose metadata has thing_dataset_id_to_contiguous_id."
        )
    return set(metadata.thing_dataset_id_to_contiguous_id.values())
