from .kmax_deeplab_head import kMaXDeepLabHead
from .mask_former_head import MaskFormerHead
from .struct_token_head import StructTokenHead

__all__ = ["MaskFormerHead", "StructTokenHead", "kMaXDeepLabHead"]
