"""``mask_former_instance``: Mask2Former's instance-segmentation training mapper."""

from typing import Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..datasets.checks import DatasetError
from .build import MAPPER_REGISTRY
from .common import MaskFormerMapperBase, check_class_ids, segmentation_to_mask, stack_masks


class MaskFormerInstanceDatasetMapper(MaskFormerMapperBase):
    """COCO instance records (``annotations`` with polygon or RLE ``segmentation``, contiguous
    ``category_id``) -> one target mask per non-crowd annotation.

    Crowd annotations (``iscrowd=1``) are dropped, as in the official mapper; annotations the crop
    removes entirely keep an empty mask (the LSJ mapper filters them instead).
    """

    # No semantic map to measure class areas on: a plain random crop.
    category_area_crop = False

    def read_labels(self, record: dict, image: np.ndarray) -> tuple[Optional[np.ndarray], list[dict]]:
        if "annotations" not in record:
            raise DatasetError(
                f"Record of {record['file_name']} has no 'annotations': {type(self).__name__} trains "
                f"on COCO instance annotations. Use the dataset's instance registration or "
                f"INPUT.DATASET_MAPPER_NAME matching its annotations."
            )
        annotations = [a for a in record.pop("annotations") if not a.get("iscrowd", 0)]
        check_class_ids(
            [a["category_id"] for a in annotations],
            self.num_classes,
            None,
            f"annotations of {record['file_name']}",
        )
        height, width = image.shape[:2]
        for annotation in annotations:
            # Masks are learnt, keypoints are not; detectron2 would demand flip indices for them.
            annotation.pop("keypoints", None)
            segmentation = annotation.get("segmentation")
            if segmentation is None:
                raise DatasetError(f"An annotation of {record['file_name']} has no 'segmentation'.")
            if isinstance(segmentation, dict) and tuple(segmentation["size"]) != (height, width):
                raise DatasetError(
                    f"An RLE mask of {record['file_name']} is {segmentation['size']} (HxW) but the "
                    f"image is {[height, width]}: masks must have the image's size."
                )
        return None, annotations

    def segments(
        self, labels: list[dict], transforms: T.TransformList, aug_input: T.AugInput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = aug_input.image.shape[:2]
        annotations = [utils.transform_instance_annotations(a, transforms, (height, width)) for a in labels]
        classes = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        masks = stack_masks(
            [segmentation_to_mask(a["segmentation"], height, width) for a in annotations], height, width
        )
        return classes, masks


@MAPPER_REGISTRY.register()
def mask_former_instance(cfg: CfgNode, is_train: bool = True) -> MaskFormerInstanceDatasetMapper:
    """MaskFormerInstanceDatasetMapper from ``cfg`` (ADE20K / Cityscapes instance recipes)."""
    return MaskFormerInstanceDatasetMapper(cfg, is_train)
