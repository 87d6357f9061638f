"""The project's config keys. ``add_kmax_m2f_config(cfg)`` is the one place that adds them."""
import logging
import os
from typing import Optional

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config

logger = logging.getLogger(__name__)


def add_kmax_m2f_config(cfg: CN) -> None:
    """Add every key this package reads to a detectron2 config, with the published defaults.

    Mask2Former's official YAMLs also use the DeepLab project's keys (``SOLVER.POLY_LR_POWER``,
    ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``, ...): they come from detectron2's own
    ``add_deeplab_config`` rather than being declared twice.
    """
    add_deeplab_config(cfg)

    # Data: which mapper turns catalog dicts into model inputs (see kmax_m2f.data).
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1

    # The fixed training size of the mappers that crop / pad to one size: Mask2Former's LSJ
    # (resize by [MIN_SCALE, MAX_SCALE] x IMAGE_SIZE, crop / pad to IMAGE_SIZE; official YAMLs
    # give an int, 1024) and kMaX-DeepLab, which also builds its relative position encodings for
    # it (official YAMLs give [H, W], e.g. [1281, 1281] or [1025, 2049]). Either form is
    # accepted; read it with ``fixed_image_size(cfg)``. Unset (None) by default: the two
    # projects' official defaults differ, and a silent one would build the wrong model.
    cfg.INPUT.IMAGE_SIZE = None
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # MiB of decoded training images and label maps each data-loader process keeps in memory
    # (kmax_m2f.data.file_cache); 0: decode every time. For small datasets seen many times, on
    # machines where the loader's workers compete with training for a few cores.
    cfg.DATALOADER.DECODED_FILE_CACHE_MB = 0

    _add_mask_former_config(cfg)
    _add_swin_config(cfg)
    _add_kmax_deeplab_config(cfg)
    _add_convnext_config(cfg)
    _add_vit_config(cfg)
    _add_struct_token_config(cfg)

    # Optimisation (Mask2Former's recipe): AdamW, backbone lr x0.1, no decay on embeddings.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Parameter names (substrings) that get no weight decay besides norms and embeddings: Swin's
    # relative position tables and absolute position embedding, as in the official recipe.
    cfg.SOLVER.WEIGHT_DECAY_EXCLUDE = ["relative_position_bias_table", "absolute_pos_embed"]


def _add_mask_former_config(cfg: CN) -> None:
    """MODEL.MASK_FORMER and the pixel-decoder keys of MODEL.SEM_SEG_HEAD, with Mask2Former's
    published values (the official add_maskformer2_config keeps MaskFormer v1's stale defaults
    for several of them, so a key missing from a YAML silently changed the model)."""
    mf = cfg.MODEL.MASK_FORMER = CN()
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
    mf.ENC_LAYERS = 0
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
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    # The deformable encoder has MODEL.MASK_FORMER.NHEADS heads, as in the official code, which
    # declares DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS but never reads it: a YAML that sets it
    # still merges, with a warning that it is ignored.
    cfg.register_deprecated_key("MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS")


def _add_swin_config(cfg: CN) -> None:
    """MODEL.SWIN: Swin Transformer backbone (defaults: Swin-T as Mask2Former trains it)."""
    swin = cfg.MODEL.SWIN = CN()
    swin.PRETRAIN_IMG_SIZE = 224
    swin.PATCH_SIZE = 4
    swin.EMBED_DIM = 96
    swin.DEPTHS = [2, 2, 6, 2]
    swin.NUM_HEADS = [3, 6, 12, 24]
    swin.WINDOW_SIZE = 7
    swin.MLP_RATIO = 4.0
    swin.QKV_BIAS = True
    swin.QK_SCALE = None
    swin.DROP_RATE = 0.0
    swin.ATTN_DROP_RATE = 0.0
    swin.DROP_PATH_RATE = 0.3
    swin.APE = False
    swin.PATCH_NORM = True
    swin.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    swin.USE_CHECKPOINT = False


def _add_kmax_deeplab_config(cfg: CN) -> None:
    """MODEL.KMAX_DEEPLAB with the key names of the official PyTorch port (bytedance/kmax-deeplab)
    and the published COCO recipe, plus the norm keys of its ResNet-50.

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
    # Panoptic predictions the evaluator saves as pictures (0: none).
    kmax.SAVE_VIS_NUM = 0
    # Feed the backbone channels-last tensors (faster convolutions on recent GPUs).
    kmax.CHANNEL_LAST_FORMAT = False

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

    # ResNet BatchNorm of kMaX's R50 (read only by custom_bn_build_resnet_backbone):
    # TensorFlow's eps and moving-average decay 0.99, i.e. PyTorch momentum 0.01.
    cfg.MODEL.RESNETS.NORM_EPS = 1e-3
    cfg.MODEL.RESNETS.NORM_MOMENTUM = 0.01


def _add_vit_config(cfg: CN) -> None:
    """MODEL.VIT: the plain ViT backbone (D2VisionTransformer) with mmseg's VisionTransformer
    defaults as StructToken's configs set them: ViT-B/16 for 512x512 crops, class token, no final
    norm, stochastic depth 0.1."""
    vit = cfg.MODEL.VIT = CN()
    # (H, W) the position embedding is built for; other sizes resample it (INTERPOLATE_MODE).
    vit.IMG_SIZE = [512, 512]
    vit.PATCH_SIZE = 16
    vit.EMBED_DIM = 768
    vit.DEPTH = 12
    vit.NUM_HEADS = 12
    vit.MLP_RATIO = 4.0
    vit.QKV_BIAS = True
    vit.DROP_RATE = 0.0
    vit.ATTN_DROP_RATE = 0.0
    vit.DROP_PATH_RATE = 0.1
    vit.WITH_CLS_TOKEN = True
    vit.FINAL_NORM = False
    vit.NORM_EPS = 1e-6
    vit.INTERPOLATE_MODE = "bicubic"


def _add_struct_token_config(cfg: CN) -> None:
    """MODEL.STRUCT_TOKEN: StructToken's head (StructTokenHead, a SEM_SEG_HEAD of detectron2's
    SemanticSegmentor), with the official ADE20K configs' values. The number of classes, the
    ignore value and the loss weight are MODEL.SEM_SEG_HEAD's."""
    st = cfg.MODEL.STRUCT_TOKEN = CN()
    # Interaction block: "CSE" (cross-slice), "SSE" (self-slice) or "PWE" (point-wise).
    st.BLOCK = "CSE"
    st.NUM_LAYERS = 4
    st.MLP_RATIO = 4
    st.DROP_RATE = 0.0
    st.ATTN_DROP_RATE = 0.0
    st.DROP_PATH_RATE = 0.1
    # Width the features are projected to; None: the backbone's (the official configs).
    st.CHANNELS = None
    st.IN_FEATURE = "last_feat"
    # The training crop (H, W): the structure tokens are this over the feature stride.
    st.IMAGE_SIZE = [512, 512]
    st.INTERPOLATE_MODE = "bicubic"

    # Sliding-window inference of SlidingWindowSemanticSegmentor (mmseg's "slide" test mode):
    # CROP_SIZE windows STRIDE apart, logits averaged where they overlap.
    cfg.TEST.SLIDING_WINDOW = CN()
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    cfg.TEST.SLIDING_WINDOW.CROP_SIZE = [512, 512]
    cfg.TEST.SLIDING_WINDOW.STRIDE = [341, 341]


def _add_convnext_config(cfg: CN) -> None:
    """MODEL.CONVNEXT: ConvNeXt backbone (D2ConvNeXt), the official port's keys and defaults:
    ConvNeXt-L, kMaX's strongest published backbone."""
    convnext = cfg.MODEL.CONVNEXT = CN()
    convnext.IN_CHANNELS = 3
    # T: [3, 3, 9, 3] / [96, 192, 384, 768]; S: [3, 3, 27, 3] / T's dims;
    # B: [3, 3, 27, 3] / [128, 256, 512, 1024]; L: below.
    convnext.DEPTHS = [3, 3, 27, 3]
    convnext.DIMS = [192, 384, 768, 1536]
    # Stochastic depth of the last block, growing linearly from 0 over all blocks.
    convnext.DROP_PATH_RATE = 0.6
    # Initial layer scale ("gamma") of each block's residual branch; <= 0: none. (The official
    # key's spelling, so that its YAMLs carry over.)
    convnext.LSIT = 1e-6
    convnext.OUT_INDICES = [0, 1, 2, 3]
    convnext.OUT_FEATURES = ["res2", "res3", "res4", "res5"]


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, bad value, missing file)."""


def fixed_image_size(cfg: CN) -> tuple[int, int]:
    """``INPUT.IMAGE_SIZE`` as (height, width): an int means a square, a pair is [H, W].

    Raises:
        ConfigError: when it is unset or not one or two positive ints.
    """
    size = cfg.INPUT.IMAGE_SIZE
    if size is None:
        raise ConfigError(
            f"INPUT.IMAGE_SIZE is not set, but INPUT.DATASET_MAPPER_NAME={cfg.INPUT.DATASET_MAPPER_NAME!r} / "
            f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} need a fixed input size: set it to an int "
            "(a square, e.g. 1024) or [H, W] (e.g. [1025, 2049])."
        )
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"INPUT.IMAGE_SIZE must be a positive int or [H, W] of positive ints, got {cfg.INPUT.IMAGE_SIZE!r}.")
    return size


def build_config(config_file: str = "", opts: Optional[list[str]] = None) -> CN:
    """detectron2's defaults + this package's keys, then ``config_file`` (``_BASE_`` chains
    allowed), then ``opts`` (["KEY", "VALUE", ...]). Unknown keys fail loudly and say where they
    came from. A CUDA device on a machine without one falls back to CPU with a warning, so the
    same YAML runs on a laptop and on a GPU node."""
    cfg = get_cfg()
    add_kmax_m2f_config(cfg)
    fix = "Check the key against kmax_m2f/config.py and detectron2/config/defaults.py."
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"Config file {config_file!r} does not exist (see configs/ for the shipped ones).")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{config_file}: {e.args[0]}. {fix}") from e
    if opts:
        # yacs reports unknown override keys and odd-length lists with assertions.
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"command-line override {list(opts)}: {e.args[0]}. Overrides are KEY VALUE pairs. {fix}") from e
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no CUDA device is available: using the CPU.", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg
