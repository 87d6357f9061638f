"""kMaX-DeepLab's config keys: MODEL.KMAX_DEEPLAB."""
from detectron2.config import CfgNode as CN

__all__ = ["add_config"]


def add_config(cfg: CN) -> None:
    """MODEL.KMAX_DEEPLAB with the key names of the official PyTorch port (bytedance/kmax-deeplab)
    and the published COCO recipe.

    Where the port's defaults differ from what its own COCO recipe trains with (the decoder's drop
    path and IN_CHANNELS), the recipe's value is the default. The port also sets INPUT.* and
    SOLVER.* keys that exist already (IMAGE_SIZE, MIN_SCALE, MAX_SCALE, SIZE_DIVISIBILITY,
    DATASET_MAPPER_NAME, OPTIMIZER, BACKBONE_MULTIPLIER, WEIGHT_DECAY_EMBED): kMaX YAMLs set
    them; their defaults here stay Mask2Former's.
    """
    kmax = cfg.MODEL.KMAX_DEEPLAB = CN()
    # The Hungarian matching of the final prediction is reused for every auxiliary (per-layer)
    # output: the paper's recipe, and one matching instead of seven per image.
    kmax.SHARE_FINAL_MATCHING = True
    # Official YAMLs set SAVE_VIS_NUM, which only the official evaluator's picture dumps read:
    # it still merges, with a warning that it is ignored (tools/demo.py draws predictions).
    cfg.register_deprecated_key("MODEL.KMAX_DEEPLAB.SAVE_VIS_NUM")
    # Feed the backbone channels-last tensors; the layout carries on into the pixel decoder.
    # The layout changes no result (tested), only speed: on it oneDNN's CPU convolutions,
    # max-pooling and LayerNorm2d run faster, so this default is on (the official one is off;
    # BENCHMARKS.md has the figures). The official port offers it for recent GPUs.
    kmax.CHANNEL_LAST_FORMAT = True
    # In training, every batch norm that feeds an activation, and the GELU that each pixel-decoder
    # block and fuse begins with, runs again in backward instead of its output being kept: about
    # 0.7 GiB less for the R50 at 641x641, batch 2, for one more pass of those norms and GELUs
    # (BENCHMARKS.md). Sync batch norms are left alone in multi-process training (their
    # collectives would run again).
    kmax.NORM_ACT_CHECKPOINT = True

    # Losses, each also applied to the 6 kMaX layers' outputs when DEEP_SUPERVISION is on:
    # PQ-style class (CLASS_WEIGHT) and mask (DICE_WEIGHT) terms, mask-id cross-entropy
    # (MASK_WEIGHT), pixel instance discrimination (INSDIS_WEIGHT); the auxiliary semantic loss
    # is on the final output only. NO_OBJECT_WEIGHT is the floor of the PQ-style weights (dice
    # for the class loss, class probability for the mask loss), so that no query gets a zero
    # weight: unmatched ones still learn to predict void.
    kmax.DEEP_SUPERVISION = True
    kmax.NO_OBJECT_WEIGHT = 1e-5
    kmax.CLASS_WEIGHT = 3.0
    kmax.DICE_WEIGHT = 3.0
    kmax.MASK_WEIGHT = 0.3
    kmax.INSDIS_WEIGHT = 1.0
    kmax.AUX_SEMANTIC_WEIGHT = 1.0
    # ASPP decoder for the semantic head (COCO / ADE20K); False: the light depthwise head of
    # the Cityscapes recipe.
    kmax.USE_AUX_SEMANTIC_DECODER = True
    # Width of the ASPP decoder (its ASPP branches and head; official: 256). Not an official key:
    # narrower decoders are for small CPU configs, whose step this decoder dominates otherwise.
    kmax.AUX_SEMANTIC_DECODER_CHANNELS = 256
    # Pixel sampling of the instance-discrimination and semantic losses: SAMPLE_K pixels drawn
    # with logits TEMPERATURE * log(HW / area of their mask), which favours small masks.
    # Cityscapes: INSDIS temperature 0.6 and the full semantic cross-entropy (SAMPLE_K 0).
    kmax.PIXEL_INSDIS_TEMPERATURE = 1.5
    kmax.PIXEL_INSDIS_SAMPLE_K = 4096
    kmax.AUX_SEMANTIC_TEMPERATURE = 2.0
    kmax.AUX_SEMANTIC_SAMPLE_K = 4096
    # Zero the predicted probabilities on void pixels in the matching and mask losses.
    kmax.MASKING_VOID_PIXEL = True
    # Batch norm of the pixel decoder, kMaX decoder and semantic head (TF eps / momentum):
    # "SyncBN" (the published recipe, multi-GPU) or "BN" (one process, or multi-process CPU
    # training, which SyncBatchNorm does not support). Not an official key (the port hard-codes
    # SyncBN); official YAMLs, which omit it, get the official behaviour.
    kmax.NORM = "SyncBN"

    # Pixel decoder: stages from stride 32 to stride 4 (axial attention where maps are small);
    # stage i outputs 4 x DEC_CHANNELS[i] channels.
    kmax.PIXEL_DEC = CN()
    kmax.PIXEL_DEC.NAME = "kMaXPixelDecoder"
    kmax.PIXEL_DEC.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    kmax.PIXEL_DEC.DEC_LAYERS = [1, 5, 1, 1]
    kmax.PIXEL_DEC.LAYER_TYPES = ["axial", "axial", "bottleneck", "bottleneck"]
    kmax.PIXEL_DEC.DEC_CHANNELS = [512, 256, 128, 64]
    kmax.PIXEL_DEC.DROP_PATH_PROB = 0.0
    # Recompute each pixel-decoder block in backward instead of keeping its activations: less
    # training memory for more time (BENCHMARKS.md has both).
    kmax.PIXEL_DEC.ACTIVATION_CHECKPOINT = False

    # kMaX decoder: DEC_LAYERS k-means layers on the stride-32 / 16 / 8 pixel features, whose
    # channels are IN_CHANNELS[:3]; IN_CHANNELS[3] is the stride-4 feature of the final
    # predictor. (The port's default lists only three, which does not build; its YAMLs list four.)
    kmax.TRANS_DEC = CN()
    kmax.TRANS_DEC.NAME = "kMaXTransformerDecoder"
    kmax.TRANS_DEC.DEC_LAYERS = [2, 2, 2]
    # Cluster centres (256 for Cityscapes).
    kmax.TRANS_DEC.NUM_OBJECT_QUERIES = 128
    kmax.TRANS_DEC.IN_CHANNELS = [2048, 1024, 512, 256]
    # COCO / Cityscapes recipe (the port's default, 0.0, is ADE20K's).
    kmax.TRANS_DEC.DROP_PATH_PROB = 0.2
    # Widths the official port hard-codes (not official keys; their defaults are its values):
    # channels of the cluster centres and of each layer's bottleneck (keys and mask embeddings
    # are half as wide), the cluster FFN's hidden width and the self-attention heads. Small
    # CPU configs shrink them.
    kmax.TRANS_DEC.HIDDEN_DIM = 256
    kmax.TRANS_DEC.DIM_FEEDFORWARD = 2048
    kmax.TRANS_DEC.NUM_HEADS = 8

    # Inference: which outputs are produced (and so which evaluators run). A mask is the pixels
    # whose probability exceeds PIXEL_CONFIDENCE_THRESHOLD; it is kept if its class probability
    # exceeds the thing / stuff threshold (COCO 0.7 / 0.5; ADE20K 0.4 / 0.4; Cityscapes 0.5 / 0.3)
    # and more than OVERLAP_THRESHOLD of it is still free (Cityscapes 0.9). Masks are pasted in
    # the order of class_prob ** REORDER_CLASS_WEIGHT * mask_score ** REORDER_MASK_WEIGHT.
    kmax.TEST = CN()
    kmax.TEST.SEMANTIC_ON = False
    kmax.TEST.INSTANCE_ON = False
    kmax.TEST.PANOPTIC_ON = True
    kmax.TEST.PIXEL_CONFIDENCE_THRESHOLD = 0.4
    kmax.TEST.CLASS_THRESHOLD_THING = 0.7
    kmax.TEST.CLASS_THRESHOLD_STUFF = 0.5
    kmax.TEST.REORDER_CLASS_WEIGHT = 1.0
    kmax.TEST.REORDER_MASK_WEIGHT = 1.0
    kmax.TEST.OVERLAP_THRESHOLD = 0.8
    kmax.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    # Pad the batch to a multiple of this; -1: the backbone's own size_divisibility. kMaX pads
    # every image to INPUT.IMAGE_SIZE anyway, which its relative position encodings need.
    kmax.SIZE_DIVISIBILITY = -1
