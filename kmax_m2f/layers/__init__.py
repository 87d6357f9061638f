"""Building blocks shared by the models of kmax_m2f."""

from .init import transformer_init
from .layer_norm import LayerNorm2d
from .mlp import Mlp
from .ms_deform_attn import MSDeformAttn, MSDeformAttnFunction, ms_deform_attn

__all__ = ["LayerNorm2d", "Mlp", "MSDeformAttn", "MSDeformAttnFunction", "ms_deform_attn", "transformer_init"]
