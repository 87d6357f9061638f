"""kmax_m2f: transformer segmentation systems as one detectron2 extension.

Importing the package registers its datasets, models and mappers with detectron2's registries.
"""
from . import data  # noqa: F401  (registers datasets and mappers)
from . import modeling  # noqa: F401  (registers models)
from .config import add_kmax_m2f_config, build_config

__all__ = ["add_kmax_m2f_config", "build_config"]
