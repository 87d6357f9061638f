"""ReSTR (Kim et al., CVPR 2022): referring image segmentation (image + sentence -> one mask) with
a ViT, a language encoder and transformer fusion, with the official code's parameter names.

``ReSTR`` is the meta-architecture; ``refer`` the dataset mapper; ``text`` the tokenizer and
word-vector loading; ``language`` the language encoders.
"""
from .config import add_config
from .language import RESTR_LANGUAGE_ENCODER_REGISTRY, GloveTransformerEncoder, HuggingFaceEncoder
from .mapper import ReferringDatasetMapper
from .meta_arch import REFER, ReSTR

__all__ = [
    "REFER",
    "RESTR_LANGUAGE_ENCODER_REGISTRY",
    "GloveTransformerEncoder",
    "HuggingFaceEncoder",
    "ReSTR",
    "ReferringDatasetMapper",
    "add_config",
]
