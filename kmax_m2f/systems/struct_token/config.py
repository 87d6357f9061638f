"""StructToken's config keys: MODEL.STRUCT_TOKEN."""
from detectron2.config import CfgNode as CN

__all__ = ["add_config"]


def add_config(cfg: CN) -> None:
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
