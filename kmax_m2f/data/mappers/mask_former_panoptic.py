"""``mask_former_panoptic``: Mask2Former's panoptic-segmentation training mapper."""

from typing import Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T

from ..datasets.checks import DatasetError
from ..panoptic import check_segment_areas, panoptic_ids, read_panoptic_png
from .build import MAPPER_REGISTRY
from .common import MaskFormerMapperBase, check_class_ids, check_label_size, read_sem_seg, stack_masks


class MaskFormerPanopticDatasetMapper(MaskFormerMapperBase):
    """COCO-panoptic records (``pan_seg_file_name`` + ``segments_info`` with contiguous
    ``category_id``) -> one target mask per non-crowd segment.

    ``gt_classes[i]`` / ``gt_masks[i]`` follow the order of ``segments_info``. As in the official
    mapper, every non-crowd segment gets a target even if the crop left none of its pixels
    (its mask is then empty). ``sem_seg`` is output too when the record has
    ``sem_seg_file_name``; the model does not need it.
    """

    def read_labels(
        self, record: dict, image: np.ndarray
    ) -> tuple[Optional[np.ndarray], tuple[np.ndarray, list[dict]]]:
        if "pan_seg_file_name" not in record or "segments_info" not in record:
            raise DatasetError(
                f"Record of {record['file_name']} has no 'pan_seg_file_name' / 'segments_info': "
                f"{type(self).__name__} trains on COCO-panoptic annotations. Use the dataset's "
                f"panoptic registration or INPUT.DATASET_MAPPER_NAME matching its annotations."
            )
        path = record.pop("pan_seg_file_name")
        segments_info = record["segments_info"]
        check_class_ids(
            [s["category_id"] for s in segments_info], self.num_classes, None, f"segments_info of {path}"
        )
        panoptic_rgb = read_panoptic_png(path, segments_info, self.file_cache)
        check_label_size(panoptic_rgb, path, image, record["file_name"])
        check_segment_areas(path, panoptic_rgb, segments_info)

        sem_seg = None
        if "sem_seg_file_name" in record:
            sem_seg = read_sem_seg(record, image, self.num_classes, self.ignore_label, self.file_cache)
            del record["sem_seg_file_name"]
        return sem_seg, (panoptic_rgb, segments_info)

    def segments(
        self, labels: tuple[np.ndarray, list[dict]], transforms: T.TransformList, aug_input: T.AugInput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        panoptic_rgb, segments_info = labels
        segment_ids = panoptic_ids(transforms.apply_segmentation(panoptic_rgb))
        kept = [s for s in segments_info if not s.get("iscrowd", 0)]
        classes = torch.tensor([s["category_id"] for s in kept], dtype=torch.int64)
        masks = stack_masks([segment_ids == s["id"] for s in kept], *segment_ids.shape)
        return classes, masks


@MAPPER_REGISTRY.register()
def mask_former_panoptic(cfg: CfgNode, is_train: bool = True) -> MaskFormerPanopticDatasetMapper:
    """MaskFormerPanopticDatasetMapper from ``cfg`` (ADE20K / Cityscapes panoptic recipes)."""
    return MaskFormerPanopticDatasetMapper(cfg, is_train)
