from typing import Callable

from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.utils.registry import Registry

MAPPER_REGISTRY = Registry("DATASET_MAPPER")
MAPPER_REGISTRY.__doc__ = """
Training-time dataset mappers, registered under the name ``INPUT.DATASET_MAPPER_NAME`` uses
(official names such as ``mask_former_semantic``): ``MAPPER_REGISTRY.get(name)(cfg, is_train)``
returns a callable that maps one catalog record to the model's input dict.
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
