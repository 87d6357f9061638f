"""Multi-scale deformable attention: the op (native CPU / CUDA kernels with a PyTorch
reference) and the ``MSDeformAttn`` layer."""

from .functions import MSDeformAttnFunction, check_ms_deform_attn_inputs, ms_deform_attn
from .modules import MSDeformAttn
from .reference import ms_deform_attn_reference

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnFunction",
    "check_ms_deform_attn_inputs",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
