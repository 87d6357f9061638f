from .mask_classification import MaskClassificationModel
from .semantic import SlidingWindowSemanticSegmentor

__all__ = ["MaskClassificationModel", "SlidingWindowSemanticSegmentor"]
