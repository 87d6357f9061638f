"""StructToken (Lin et al., 2022): semantic segmentation by learnable per-class structure tokens
interacting with a plain ViT's features (CSE / SSE / PWE blocks), with the official parameter names.

``StructTokenHead`` is a SEM_SEG_HEAD of detectron2's semantic segmentor (with sliding-window
inference: ``SlidingWindowSemanticSegmentor``) on the mmseg-named ViT backbone; ``checkpoint``
converts official mmseg checkpoints.
"""
from .config import add_config
from .head import StructTokenHead

__all__ = ["StructTokenHead", "add_config"]
