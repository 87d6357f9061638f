"""The project's config keys. ``add_kmax_m2f_config(cfg)`` is the one place that adds them."""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config


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

    # Optimisation (Mask2Former's recipe): AdamW, backbone lr x0.1, no decay on embeddings.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Parameter names (substrings) that get no weight decay besides norms and embeddings.
    cfg.SOLVER.WEIGHT_DECAY_EXCLUDE = []
