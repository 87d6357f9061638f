"""Building blocks shared by the models of kmax_m2f."""

from .depthwise_conv import DepthwiseConv2d
from .layer_norm import LayerNorm2d
from .ms_deform_attn import MSDeformAttn, MSDeformAttnFunction, ms_deform_attn

__all__ = ["DepthwiseConv2d", "LayerNorm2d", "MSDeformAttn", "MSDeformAttnFunction", "ms_deform_attn"]
