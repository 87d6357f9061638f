from .kmax_deeplab import kMaXDeepLab
from .mask_former import MaskFormer
from .semantic import SlidingWindowSemanticSegmentor

__all__ = ["MaskFormer", "SlidingWindowSemanticSegmentor", "kMaXDeepLab"]
