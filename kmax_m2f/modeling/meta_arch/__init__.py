from .kmax_deeplab import kMaXDeepLab
from .mask_former import MaskFormer

__all__ = ["MaskFormer", "kMaXDeepLab"]
