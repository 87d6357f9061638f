from .kmax_deeplab_head import kMaXDeepLabHead
from .mask_former_head import MaskFormerHead

__all__ = ["MaskFormerHead", "kMaXDeepLabHead"]
