"""kMaX-DeepLab (Yu et al., ECCV 2022): k-means mask transformer for panoptic segmentation, with
the module and parameter names of the official PyTorch port (bytedance/kmax-deeplab).

backbone -> kMaXDeepLabHead (kMaXPixelDecoder + kMaXTransformerDecoder with its auxiliary
semantic head) -> kMaXSetCriterion (training) / panoptic, semantic and instance inference; its
training mapper ``kmax_panoptic`` (copy-paste, stride-4 ground truth).
"""
from .config import add_config
from .head import kMaXDeepLabHead
from .mapper import KMaXPanopticDatasetMapper
from .meta_arch import kMaXDeepLab
from .pixel_decoder import kMaXPixelDecoder
from .transformer_decoder import KMAX_DECODER_REGISTRY, kMaXTransformerDecoder

__all__ = [
    "KMAX_DECODER_REGISTRY",
    "KMaXPanopticDatasetMapper",
    "add_config",
    "kMaXDeepLab",
    "kMaXDeepLabHead",
    "kMaXPixelDecoder",
    "kMaXTransformerDecoder",
]
