from . import datasets  # noqa: F401  (registers the datasets detectron2 lacks)
from .mappers import MAPPER_REGISTRY, build_mapper, build_test_mapper

__all__ = ["MAPPER_REGISTRY", "build_mapper", "build_test_mapper"]
