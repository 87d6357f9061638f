from .kmax import kMaXTransformerDecoder
from .mask2former import TRANSFORMER_DECODER_REGISTRY, MultiScaleMaskedTransformerDecoder, build_transformer_decoder

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "MultiScaleMaskedTransformerDecoder",
    "build_transformer_decoder",
    "kMaXTransformerDecoder",
]
