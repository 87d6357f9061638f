"""Config keys of the backbones this package adds to detectron2's: MODEL.SWIN, MODEL.CONVNEXT,
MODEL.VIT, and the batch-norm keys of the TF-style ResNet (custom_bn_build_resnet_backbone)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_backbone_config"]


def add_backbone_config(cfg: CN) -> None:
    """Add MODEL.SWIN, MODEL.CONVNEXT, MODEL.VIT and MODEL.RESNETS.NORM_EPS / NORM_MOMENTUM."""
    _add_swin_config(cfg)
    _add_convnext_config(cfg)
    _add_vit_config(cfg)
    # BatchNorm of kMaX's ResNet-50 (read only by custom_bn_build_resnet_backbone): TensorFlow's
    # eps and moving-average decay 0.99, i.e. PyTorch momentum 0.01.
    cfg.MODEL.RESNETS.NORM_EPS = 1e-3
    cfg.MODEL.RESNETS.NORM_MOMENTUM = 0.01


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
