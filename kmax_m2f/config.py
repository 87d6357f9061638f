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

    # Which outputs a MaskFormer model predicts at test time (and so which evaluators run).
    # The Mask2Former model issue adds the rest of this namespace.
    cfg.MODEL.MASK_FORMER = CN()
    cfg.MODEL.MASK_FORMER.TEST = CN()
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False

    # Optimisation (Mask2Former's recipe): AdamW, backbone lr x0.1, no decay on embeddings.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Parameter names (substrings) that get no weight decay besides norms and embeddings.
    cfg.SOLVER.WEIGHT_DECAY_EXCLUDE = []


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, bad value, missing file)."""


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
