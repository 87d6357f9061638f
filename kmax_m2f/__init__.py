"""kmax_m2f: transformer segmentation systems as one detectron2 extension.

Importing the package registers its datasets, mappers, backbones and every system
(:mod:`kmax_m2f.systems`) with detectron2's registries.
"""
from . import data  # noqa: F401  (registers datasets and mappers)
from . import modeling  # noqa: F401  (registers the shared backbones and meta-architectures)
from . import systems  # noqa: F401  (registers each system's models)
from .config import add_kmax_m2f_config, build_config

__all__ = ["add_kmax_m2f_config", "build_config"]
