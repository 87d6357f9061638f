"""kmax_m2f: transformer segmentation systems as one detectron2 extension.

Importing the package registers its datasets, mappers, backbones and every system
(:mod:`kmax_m2f.systems`) with detectron2's registries.
"""
import warnings

with warnings.catch_warnings():
    # fvcore's focal losses and detectron2's box regression are compiled with torch.jit.script
    # when imported, which recent PyTorch answers with a FutureWarning each; none is used here.
    # Tools import this package before detectron2 so that those imports happen here, silenced.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import fvcore.nn  # noqa: F401
    import detectron2.modeling  # noqa: F401

from . import data  # noqa: F401  (registers datasets and mappers)
from . import modeling  # noqa: F401  (registers the shared backbones and meta-architectures)
from . import systems  # noqa: F401  (registers each system's models)
from .config import add_kmax_m2f_config, build_config

__all__ = ["add_kmax_m2f_config", "build_config"]
