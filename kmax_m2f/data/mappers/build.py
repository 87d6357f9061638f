import logging
from typing import Callable, Optional

from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.utils.registry import Registry

from ..images import UnreadableImageError

logger = logging.getLogger(__name__)

MAPPER_REGISTRY = Registry("DATASET_MAPPER")
MAPPER_REGISTRY.__doc__ = """
Training-time dataset mappers, registered under the name ``INPUT.DATASET_MAPPER_NAME`` uses
(official names such as ``mask_former_semantic``): ``MAPPER_REGISTRY.get(name)(cfg, is_train)``
returns a callable that maps one catalog record to the model's input dict. A mapper that also
prepares test data (its model needs more than detectron2's test-time resize, e.g. a sentence)
sets the attribute ``maps_test_data = True`` on its registered function.
"""


@MAPPER_REGISTRY.register()
def detectron2_default(cfg: CfgNode, is_train: bool = True) -> DatasetMapper:
    """detectron2's own mapper, for models that read ``instances`` / ``sem_seg`` its way."""
    return DatasetMapper(cfg, is_train)


class SkipUnreadableImages:
    """A training mapper that returns None for a record whose image cannot be read, so that
    detectron2's ``MapDataset`` draws another record, and warns with the running count (per
    data-loader process: each worker counts its own)."""

    def __init__(self, mapper: Callable[[dict], Optional[dict]]):
        self.mapper = mapper
        self.num_skipped = 0

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        try:
            return self.mapper(dataset_dict)
        except UnreadableImageError as e:
            self.num_skipped += 1
            logger.warning("Skipped: %s %d unreadable image(s) skipped so far in this process.", e, self.num_skipped)
            return None


def build_mapper(cfg: CfgNode, is_train: bool = True) -> Callable[[dict], Optional[dict]]:
    """The mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``; in training, wrapped by
    :class:`SkipUnreadableImages` when ``cfg.DATALOADER.SKIP_UNREADABLE_IMAGES``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPER_REGISTRY:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not a registered mapper; choose one of "
            f"{sorted(k for k, _ in MAPPER_REGISTRY)}."
        )
    mapper = MAPPER_REGISTRY.get(name)(cfg, is_train)
    if is_train and cfg.DATALOADER.SKIP_UNREADABLE_IMAGES:
        return SkipUnreadableImages(mapper)
    return mapper


def build_test_mapper(cfg: CfgNode) -> Optional[Callable[[dict], dict]]:
    """The named mapper in test mode when it prepares test data (``maps_test_data``), else None
    (detectron2's default test mapper)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name in MAPPER_REGISTRY and getattr(MAPPER_REGISTRY.get(name), "maps_test_data", False):
        return MAPPER_REGISTRY.get(name)(cfg, is_train=False)
    return None
