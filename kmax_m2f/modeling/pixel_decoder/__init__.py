from .msdeform import MSDeformAttnPixelDecoder, build_pixel_decoder

__all__ = ["MSDeformAttnPixelDecoder", "build_pixel_decoder"]
