"""Backbones registered in detectron2's ``BACKBONE_REGISTRY`` (ResNet comes from detectron2)."""
from .swin import D2SwinTransformer, SwinTransformer

__all__ = ["D2SwinTransformer", "SwinTransformer"]
