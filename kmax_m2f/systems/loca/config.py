"""LOCA's config keys: MODEL.LOCA (model, losses, teacher) and INPUT.LOCA (views), with the
official ViT-B/16 ImageNet-1k recipe's values as defaults."""
from detectron2.config import CfgNode as CN

__all__ = ["add_config"]


def add_config(cfg: CN) -> None:
    """Add MODEL.LOCA and INPUT.LOCA."""
    loca = cfg.MODEL.LOCA = CN()
    # Fraction of the reference view's tokens the position head sees: a contiguous raster-order
    # run at a random offset, int(0.2 x 196) = 39 at 224 px. The teacher encodes all of them.
    loca.REFERENCE_KEEP_RATIO = 0.2
    # Heads of g's cross-attention; 0: MODEL.VIT.NUM_HEADS (its MLP is the ViT's width).
    loca.POSITION_HEAD_NUM_HEADS = 0
    # The patch cluster prediction loss (MSN-style) and its projection head: NUM_LAYERS x
    # (Linear to HIDDEN_DIM, GELU), Linear to BOTTLENECK_DIM, L2 norm, NUM_PROTOTYPES
    # weight-normalised prototypes.
    loca.CLUSTER_LOSS = True
    loca.PROJECTION_NUM_LAYERS = 2
    loca.PROJECTION_HIDDEN_DIM = 2048
    loca.PROJECTION_BOTTLENECK_DIM = 256
    loca.NUM_PROTOTYPES = 4096
    loca.STUDENT_TEMPERATURE = 0.1
    loca.TEACHER_TEMPERATURE = 0.05
    loca.SINKHORN_ITERATIONS = 3
    # Weight of the mean-entropy maximisation regulariser.
    loca.ME_MAX_WEIGHT = 1.0
    # The teacher's EMA momentum at the start; it rises to 1 along a half cosine over MAX_ITER.
    loca.TEACHER_MOMENTUM = 0.996

    views = cfg.INPUT.LOCA = CN()
    # Reference: an Inception crop of REFERENCE_SCALE of the image area, resized to a square of
    # REFERENCE_SIZE (its patches are the positions to predict), never flipped.
    views.REFERENCE_SIZE = 224
    views.REFERENCE_SCALE = [0.32, 1.0]
    # The large query (flipped at random, solarised with SOLARIZE_PROB); the student encodes
    # QUERY_TOKENS_KEPT of its patches, chosen at random (<= 0: all).
    views.QUERY_SIZE = 224
    views.QUERY_SCALE = [0.32, 1.0]
    views.QUERY_TOKENS_KEPT = 70
    # Focal queries: small crops, flipped at random.
    views.NUM_FOCAL_QUERIES = 9
    views.FOCAL_SIZE = 96
    views.FOCAL_SCALE = [0.05, 0.32]
    # Colour distortions of every view (SimCLR's, TF semantics): jitter with COLOR_JITTER_PROB
    # (additive brightness, contrast, saturation, hue), grey with GRAYSCALE_PROB.
    views.COLOR_JITTER_PROB = 0.8
    views.BRIGHTNESS = 0.4
    views.CONTRAST = 0.4
    views.SATURATION = 0.2
    views.HUE = 0.1
    views.GRAYSCALE_PROB = 0.2
    views.SOLARIZE_PROB = 0.2
