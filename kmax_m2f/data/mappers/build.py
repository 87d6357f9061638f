from typing import Callable, Optional

from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.utils.registry import Registry

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


def build_mapper(cfg: CfgNode, is_train: bool = True) -> Callable[[dict], dict]:
    """The mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPER_REGISTRY:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not a registered mapper; choose one of "
            f"{sorted(k for k, _ in MAPPER_REGISTRY)}."
        )
    return MAPPER_REGISTRY.get(name)(cfg, is_train)


def build_test_mapper(cfg: CfgNode) -> Optional[Callable[[dict], dict]]:
    """The named mapper in test mode when it prepares test data (``maps_test_data``), else None
    (detectron2's default test mapper)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name in MAPPER_REGISTRY and getattr(MAPPER_REGISTRY.get(name), "maps_test_data", False):
        return MAPPER_REGISTRY.get(name)(cfg, is_train=False)
    return None
