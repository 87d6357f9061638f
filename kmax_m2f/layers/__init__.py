"""Building blocks shared by the models of kmax_m2f."""

from .ms_deform_attn import MSDeformAttn, MSDeformAttnFunction, ms_deform_attn

__all__ = ["MSDeformAttn", "MSDeformAttnFunction", "ms_deform_attn"]
