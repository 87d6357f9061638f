"""Mask2Former (Cheng et al., CVPR 2022): masked-attention mask transformer for panoptic, instance
and semantic segmentation, with the official module and parameter names.

backbone -> MaskFormerHead (MSDeformAttnPixelDecoder + MultiScaleMaskedTransformerDecoder) ->
SetCriterion (training) / semantic, panoptic and instance inference. Its training mappers
(``mask_former_*``, ``coco_*_lsj``) are shared ones, in :mod:`kmax_m2f.data.mappers`.
"""
from .config import add_config
from .head import MaskFormerHead
from .meta_arch import MaskFormer
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import TRANSFORMER_DECODER_REGISTRY, MultiScaleMaskedTransformerDecoder

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "MSDeformAttnPixelDecoder",
    "MaskFormer",
    "MaskFormerHead",
    "MultiScaleMaskedTransformerDecoder",
    "add_config",
]
