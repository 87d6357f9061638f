"""What every set criterion shares: the matcher type, the number of target masks across workers
that losses are normalised by, and the per-output loss weights (deep supervision)."""
from typing import Callable

import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch import Tensor

__all__ = ["Matcher", "apply_loss_weights", "build_weight_dict", "num_masks_across_workers"]

# (outputs, targets) -> per image (pred_indices, target_indices), e.g. a HungarianMatcher.
Matcher = Callable[[dict[str, Tensor], list[dict[str, Tensor]]], list[tuple[Tensor, Tensor]]]


def num_masks_across_workers(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Number of target masks in the batch, averaged over all workers and at least 1.

    Every worker then divides by the same number, so each mask weighs the same whichever worker
    it lands on.
    """
    num_masks = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = comm.get_world_size()
    if world_size > 1:
        dist.all_reduce(num_masks)
    return torch.clamp(num_masks / world_size, min=1).item()


def build_weight_dict(weights: dict[str, float], num_aux_outputs: int) -> dict[str, float]:
    """``weights`` of the final-output losses plus, for each auxiliary output i, the same weights
    under the keys suffixed ``_{i}`` that :class:`SetCriterion` produces.

    Example: ``build_weight_dict({"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}, 9)`` for
    Mask2Former's 10 supervised predictions (DEC_LAYERS = 10 with deep supervision).
    """
    weight_dict = dict(weights)
    for i in range(num_aux_outputs):
        weight_dict.update({f"{k}_{i}": v for k, v in weights.items()})
    return weight_dict


def apply_loss_weights(losses: dict[str, Tensor], weight_dict: dict[str, float], owner: str) -> dict[str, Tensor]:
    """Each loss times its ``weight_dict`` entry. A loss without a weight is an error rather than
    silently dropped: with deep supervision off, leave "aux_outputs" out of the outputs.

    Args:
        owner: the criterion's name, for the error message.
    """
    missing = sorted(set(losses) - set(weight_dict))
    if missing:
        raise KeyError(f"{owner}.weight_dict has no weight for {missing}.")
    return {name: value * weight_dict[name] for name, value in losses.items()}
