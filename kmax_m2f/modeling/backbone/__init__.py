"""Backbones registered in detectron2's ``BACKBONE_REGISTRY`` (ResNet comes from detectron2)."""
from .convnext import ConvNeXt, D2ConvNeXt  # noqa: F401  (registers D2ConvNeXt)
from .resnet_norm import custom_bn_build_resnet_backbone  # noqa: F401  (registers it)
from .swin import D2SwinTransformer, SwinTransformer
from .vit import D2VisionTransformer, VisionTransformer

__all__ = ["D2SwinTransformer", "D2VisionTransformer", "SwinTransformer", "VisionTransformer"]
