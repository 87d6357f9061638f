"""``mask_former_semantic``: Mask2Former's semantic-segmentation training mapper."""

from typing import Any, Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T

from ..datasets.checks import DatasetError
from .build import MAPPER_REGISTRY
from .common import MaskFormerMapperBase, read_sem_seg, stack_masks


class MaskFormerSemanticDatasetMapper(MaskFormerMapperBase):
    """Semantic records (``file_name``, ``sem_seg_file_name``) -> one target mask per class present.

    Output (see :class:`MaskFormerMapperBase`): ``image``, ``sem_seg`` [H, W] int64 and
    ``instances`` whose ``gt_classes`` are the classes present in the augmented crop (ignore label
    excluded, ascending) and whose ``gt_masks[i]`` is ``sem_seg == gt_classes[i]``.
    """

    def read_labels(self, record: dict, image: np.ndarray) -> tuple[Optional[np.ndarray], Any]:
        if "sem_seg_file_name" not in record:
            raise DatasetError(
                f"Record of {record['file_name']} has no 'sem_seg_file_name': mask_former_semantic "
                f"trains on semantic label PNGs. Use the dataset's semantic registration (e.g. "
                f"*_sem_seg_train) or INPUT.DATASET_MAPPER_NAME matching its annotations "
                f"(mask_former_panoptic, mask_former_instance)."
            )
        sem_seg = read_sem_seg(record, image, self.num_classes, self.ignore_label, self.file_cache)
        del record["sem_seg_file_name"]
        # Semantic training has no use for instance annotations a record may also carry.
        record.pop("annotations", None)
        return sem_seg, None

    def segments(
        self, labels: Any, transforms: T.TransformList, aug_input: T.AugInput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sem_seg = aug_input.sem_seg
        classes = np.unique(sem_seg)
        classes = classes[classes != self.ignore_label].astype(np.int64)
        masks = stack_masks([sem_seg == c for c in classes], *sem_seg.shape)
        return torch.from_numpy(classes), masks


@MAPPER_REGISTRY.register()
def mask_former_semantic(cfg: CfgNode, is_train: bool = True) -> MaskFormerSemanticDatasetMapper:
    """MaskFormerSemanticDatasetMapper from ``cfg`` (ADE20K / Cityscapes semantic recipes)."""
    return MaskFormerSemanticDatasetMapper(cfg, is_train)
