"""The project's config keys. ``add_kmax_m2f_config(cfg)`` is the one place that adds them."""
import logging
import os
from typing import Optional

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from .modeling.backbone.config import add_backbone_config

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
    # Training only: a record whose image file is missing, empty, truncated or undecodable is
    # replaced by another record (detectron2's loader draws one) with a warning that counts them,
    # instead of stopping the run. Off by default: a broken file in a curated dataset is a bug.
    cfg.DATALOADER.SKIP_UNREADABLE_IMAGES = False

    # Sliding-window inference of SlidingWindowSemanticSegmentor (mmseg's "slide" test mode):
    # CROP_SIZE windows STRIDE apart, logits averaged where they overlap.
    cfg.TEST.SLIDING_WINDOW = CN()
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    cfg.TEST.SLIDING_WINDOW.CROP_SIZE = [512, 512]
    cfg.TEST.SLIDING_WINDOW.STRIDE = [341, 341]

    add_backbone_config(cfg)
    # Each system's keys (kmax_m2f/systems/*/config.py); imported here, not at the top, because
    # the systems' modules themselves import this one.
    from .systems import add_systems_config

    add_systems_config(cfg)

    # Optimisation (Mask2Former's recipe): AdamW, backbone lr x0.1, no decay on embeddings.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Parameter names (substrings) that get no weight decay besides norms and embeddings: Swin's
    # relative position tables and absolute position embedding, as in the official recipe.
    cfg.SOLVER.WEIGHT_DECAY_EXCLUDE = ["relative_position_bias_table", "absolute_pos_embed"]


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


def _missing_base_message(config_file: str, missing: str) -> str:
    """Which YAML of ``config_file``'s ``_BASE_`` chain names the missing file ``missing``."""
    referring, written, path = config_file, None, config_file
    while os.path.isfile(path):
        with open(path) as f:
            base = (yaml.safe_load(f) or {}).get("_BASE_")
        if not base:
            break
        referring, written = path, base
        path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    return (
        f"{os.path.normpath(referring)}: its _BASE_ {written!r} ({os.path.normpath(missing)}) does not exist; a _BASE_ "
        "path is relative to the YAML that names it."
    )


def build_config(config_file: str = "", opts: Optional[list[str]] = None) -> CN:
    """detectron2's defaults + this package's keys, then ``config_file`` (``_BASE_`` chains
    allowed), then ``opts`` (["KEY", "VALUE", ...]). Unknown keys fail loudly and say where they
    came from. A CUDA device on a machine without one falls back to CPU with a warning, so the
    same YAML runs on a laptop and on a GPU node. Dataset names ``folder:PATH`` are registered as
    the unlabelled images under PATH (kmax_m2f.data.datasets.image_folder)."""
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
        except FileNotFoundError as e:
            raise ConfigError(_missing_base_message(config_file, e.filename)) from e
    if opts:
        flags = [opt for opt in opts if isinstance(opt, str) and opt.startswith("--")]
        if flags:
            # argparse hands everything after the first KEY to the overrides, tool options included.
            raise ConfigError(
                f"{flags} came after the KEY VALUE overrides, where they are read as config keys: put the "
                f"tool's options first, e.g. --config-file FILE {' '.join(flags)} KEY VALUE ..."
            )
        # yacs reports unknown override keys and odd-length lists with assertions.
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"command-line override {list(opts)}: {e.args[0]}. Overrides are KEY VALUE pairs. {fix}") from e
    # Imported here: the data package imports this module.
    from .data.datasets.image_folder import register_folder_datasets

    register_folder_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no CUDA device is available: using the CPU.", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg
