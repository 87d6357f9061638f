"""Dataset mappers (catalog dict -> model input), chosen by name with ``INPUT.DATASET_MAPPER_NAME``."""
from .build import MAPPER_REGISTRY, build_mapper, build_test_mapper
# Importing the mapper modules registers them.
from . import (  # noqa: F401
    coco_lsj,
    mask_former_instance,
    mask_former_panoptic,
    mask_former_semantic,
)

__all__ = ["MAPPER_REGISTRY", "build_mapper", "build_test_mapper"]
