from .kmax import kMaXPixelDecoder  # noqa: F401  (registers it in SEM_SEG_HEADS_REGISTRY)
from .msdeform import MSDeformAttnPixelDecoder, build_pixel_decoder

__all__ = ["MSDeformAttnPixelDecoder", "build_pixel_decoder"]
