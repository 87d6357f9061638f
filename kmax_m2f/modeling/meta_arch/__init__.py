from .mask_former import MaskFormer

__all__ = ["MaskFormer"]
