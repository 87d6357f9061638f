"""Training losses of the meta-architectures; the point-sampled mask losses are shared."""

from .losses import (
    batch_dice_loss,
    batch_sigmoid_ce_loss,
    calculate_uncertainty,
    dice_loss,
    sigmoid_ce_loss,
)
from .kmax import kMaXMatchingCost, kMaXSetCriterion, kmax_class_similarity, kmax_mask_similarity
from .mask2former import SetCriterion, build_weight_dict, num_masks_across_workers

__all__ = [
    "SetCriterion",
    "kMaXSetCriterion",
    "kMaXMatchingCost",
    "kmax_class_similarity",
    "kmax_mask_similarity",
    "build_weight_dict",
    "num_masks_across_workers",
    "sigmoid_ce_loss",
    "dice_loss",
    "batch_sigmoid_ce_loss",
    "batch_dice_loss",
    "calculate_uncertainty",
]
