"""Dataset mappers (catalog dict -> model input), chosen by name with ``INPUT.DATASET_MAPPER_NAME``."""
from .build import MAPPER_REGISTRY, build_mapper

__all__ = ["MAPPER_REGISTRY", "build_mapper"]
