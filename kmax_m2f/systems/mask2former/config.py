"""Mask2Former's config keys: MODEL.MASK_FORMER and the pixel decoder's MODEL.SEM_SEG_HEAD keys."""
from detectron2.config import CfgNode as CN

__all__ = ["add_config"]


def add_config(cfg: CN) -> None:
    """MODEL.MASK_FORMER and the pixel-decoder keys of MODEL.SEM_SEG_HEAD, with Mask2Former's
    published values (the official add_maskformer2_config keeps MaskFormer v1's stale defaults
    for several of them, so a key missing from a YAML silently changed the model)."""
    mf = cfg.MODEL.MASK_FORMER = CN()
    # Official YAMLs set MASK_FORMER.ENC_LAYERS, which no official module reads: it still merges,
    # with a warning that it is ignored.
    cfg.register_deprecated_key("MODEL.MASK_FORMER.ENC_LAYERS")
    # Loss: weights of class cross-entropy, mask BCE and mask Dice; no-object class weight.
    mf.DEEP_SUPERVISION = True
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 2.0
    mf.MASK_WEIGHT = 5.0
    mf.DICE_WEIGHT = 5.0
    # Point-sampled losses (PointRend importance sampling): 112 * 112 points per mask.
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75

    # Transformer decoder.
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    mf.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    mf.NHEADS = 8
    mf.DROPOUT = 0.0
    mf.DIM_FEEDFORWARD = 2048
    # 9 masked-attention layers + the prediction from the initial queries.
    mf.DEC_LAYERS = 10
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.ENFORCE_INPUT_PROJ = False
    # Pad inputs to a multiple of this (ResNet reports 0; the decoder's strides need 32).
    mf.SIZE_DIVISIBILITY = 32

    # Inference: which outputs are produced (and so which evaluators run), and the panoptic /
    # instance thresholds of the paper.
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.INSTANCE_ON = False
    mf.TEST.PANOPTIC_ON = False
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.8
    mf.TEST.OVERLAP_THRESHOLD = 0.8
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    # Pixel decoder (MODEL.SEM_SEG_HEAD holds detectron2's generic head keys too).
    head = cfg.MODEL.SEM_SEG_HEAD
    head.MASK_DIM = 256
    head.TRANSFORMER_ENC_LAYERS = 6
    # Recompute each deformable encoder layer in backward instead of keeping its activations:
    # less training memory for more time (BENCHMARKS.md has both).
    head.TRANSFORMER_ENC_ACTIVATION_CHECKPOINT = False
    # Recompute only each encoder layer's first norm and FFN (its 1024-wide hidden is the
    # layer's largest activation) in backward: about 40% of the layer's activations for one more
    # 256 -> 1024 matmul per layer (BENCHMARKS.md). Covered by the switch above when that is on.
    head.TRANSFORMER_ENC_FFN_CHECKPOINT = True
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    # The deformable encoder has MODEL.MASK_FORMER.NHEADS heads, as in the official code, which
    # declares DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS but never reads it: a YAML that sets it
    # still merges, with a warning that it is ignored.
    cfg.register_deprecated_key("MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS")
