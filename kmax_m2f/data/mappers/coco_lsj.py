"""``coco_instance_lsj`` / ``coco_panoptic_lsj``: Mask2Former's COCO mappers with large-scale
jitter (the official COCOInstanceNewBaselineDatasetMapper / COCOPanopticNewBaselineDatasetMapper).

Both output an exactly ``INPUT.IMAGE_SIZE`` square image (``FixedSizeCrop`` pads it with 128),
``padding_mask`` [H, W] bool (True on the pixels the crop padded), and give every instance a
``gt_boxes`` box tight around its visible mask.
"""

from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks

from .build import MAPPER_REGISTRY
from .common import lsj_augmentations
from .mask_former_instance import MaskFormerInstanceDatasetMapper
from .mask_former_panoptic import MaskFormerPanopticDatasetMapper


class _LargeScaleJitterMixin:
    """LSJ augmentations, no padding of its own, boxes from masks, and the padding mask."""

    drop_empty_instances: bool

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = lsj_augmentations(cfg)
        # FixedSizeCrop already makes every image IMAGE_SIZE square.
        ret["size_divisibility"] = -1
        return ret

    def finish(self, record: dict, transforms: T.TransformList, input_hw: tuple[int, int]) -> None:
        # FixedSizeCrop pads label maps with 255 (0 in older detectron2), which a decoded RLE mask
        # would read as foreground and a semantic map as a class if the ignore label is not 255.
        # Any value but the 1 written here marks padding, whichever version runs.
        padded = transforms.apply_segmentation(np.ones(input_hw, dtype=np.uint8)) != 1
        padding_mask = torch.from_numpy(np.ascontiguousarray(padded))
        record["padding_mask"] = padding_mask
        if "sem_seg" in record:
            record["sem_seg"][padding_mask] = self.ignore_label

        instances = record["instances"]
        instances.gt_masks[:, padding_mask] = False
        masks = BitMasks(instances.gt_masks)
        # Boxes from the masks rather than the transformed annotation boxes: after a crop, the old
        # box intersected with the crop need not be tight around what is still visible.
        instances.gt_boxes = masks.get_bounding_boxes()
        if self.drop_empty_instances:
            instances.gt_masks = masks
            instances = utils.filter_empty_instances(instances)
            instances.gt_masks = instances.gt_masks.tensor
        record["instances"] = instances


class COCOInstanceNewBaselineDatasetMapper(_LargeScaleJitterMixin, MaskFormerInstanceDatasetMapper):
    """COCO instance records with LSJ. Instances the crop removed (empty box or mask) are
    dropped, as in the official mapper."""

    drop_empty_instances = True


class COCOPanopticNewBaselineDatasetMapper(_LargeScaleJitterMixin, MaskFormerPanopticDatasetMapper):
    """COCO-panoptic records with LSJ. As in the official mapper, segments the crop removed keep
    an empty mask (and a zero box)."""

    drop_empty_instances = False


@MAPPER_REGISTRY.register()
def coco_instance_lsj(cfg: CfgNode, is_train: bool = True) -> COCOInstanceNewBaselineDatasetMapper:
    """COCOInstanceNewBaselineDatasetMapper from ``cfg`` (COCO instance recipe)."""
    return COCOInstanceNewBaselineDatasetMapper(cfg, is_train)


@MAPPER_REGISTRY.register()
def coco_panoptic_lsj(cfg: CfgNode, is_train: bool = True) -> COCOPanopticNewBaselineDatasetMapper:
    """COCOPanopticNewBaselineDatasetMapper from ``cfg`` (COCO panoptic recipe)."""
    return COCOPanopticNewBaselineDatasetMapper(cfg, is_train)
