"""Hungarian matching between predicted masks and ground-truth segments, with pluggable costs.

One matcher serves every meta-architecture: it slices the outputs per image, asks a cost
function for a [Q, N] cost matrix, checks it and solves the assignment with
``scipy.optimize.linear_sum_assignment``. Mask2Former's cost is the default; another system
(kMaX-DeepLab: -dice x p_class) passes its own ``cost_fn``.
"""

from typing import Callable, Optional

import torch
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .losses import batch_dice_loss, batch_sigmoid_ce_loss
from ..layers.precision import at_least_float32

__all__ = ["CostFn", "HungarianMatcher"]

# (outputs of one image, target of one image) -> [Q, N] cost. The per-image outputs hold every
# tensor entry of the batched outputs indexed at the image, e.g. "pred_logits" [Q, K+1] and
# "pred_masks" [Q, H, W]; the target is the image's dict, e.g. "labels" [N] and "masks" [N, H', W'].
CostFn = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising a per-image cost.

    Default cost (Mask2Former), for prediction q and target n of one image::

        cost_class * (-softmax(pred_logits)[q, label_n])
        + cost_mask * mean BCE(pred_mask_q, mask_n) + cost_dice * Dice(pred_mask_q, mask_n)

    with BCE and Dice on ``num_points`` points drawn uniformly in [0, 1]^2, the same points for all
    predictions and targets of the image, in float32 and without gradient.

    To match with another cost, pass ``cost_fn`` (a callable or an ``nn.Module``, see
    :data:`CostFn`); ``cost_class``, ``cost_mask``, ``cost_dice`` and ``num_points`` then play no
    part. A ``cost_fn`` runs under ``torch.no_grad`` and must return a finite [Q, N] tensor.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 12544,
        cost_fn: Optional[CostFn] = None,
    ):
        """
        Args:
            cost_class: weight of the classification cost -p(target class).
            cost_mask: weight of the point-sampled sigmoid BCE between masks.
            cost_dice: weight of the point-sampled Dice loss between masks.
            num_points: number of uniformly sampled points for the mask costs.
            cost_fn: replaces the Mask2Former cost above when given.
        """
        super().__init__()
        if cost_fn is None:
            if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
                raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice are all 0.")
            if num_points <= 0:
                raise ValueError(f"HungarianMatcher: num_points must be positive, got {num_points}.")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.cost_fn = cost_fn

    def mask_former_cost(
        self,
        outputs: dict[str, Tensor],
        target: dict[str, Tensor],
        point_coords: Optional[Tensor] = None,
    ) -> Tensor:
        """Mask2Former's matching cost for one image.

        Args:
            outputs: "pred_logits" [Q, K+1] and "pred_masks" [Q, H, W] (logits) of one image.
            target: "labels" [N] int64 in [0, K) and "masks" [N, H', W'] (float or bool, any
                resolution; it is read in the same normalised [0, 1]^2 frame as the predictions).
            point_coords: [P, 2] points in [0, 1]^2 (x, y) where the masks are compared; by
                default ``num_points`` uniform random points.

        Returns:
            [Q, N] float32 cost.
        """
        pred_masks = outputs["pred_masks"]
        device = pred_masks.device
        if point_coords is None:
            point_coords = torch.rand(self.num_points, 2, device=device)
        # Mixed precision would make the BCE / sigmoid sums inexact over 12k points.
        with torch.autocast(device_type=device.type, enabled=False):
            prob = at_least_float32(outputs["pred_logits"]).softmax(-1)
            cost_class = -prob[:, target["labels"]]

            point_logits = _sample(at_least_float32(pred_masks), point_coords)
            point_labels = _sample(target["masks"].to(device=device, dtype=point_logits.dtype), point_coords)
            cost_mask = batch_sigmoid_ce_loss(point_logits, point_labels)
            cost_dice = batch_dice_loss(point_logits, point_labels)
        return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: "pred_logits" [B, Q, K+1], "pred_masks" [B, Q, H, W] and whatever else the
                cost needs; non-tensor entries (e.g. "aux_outputs") are ignored.
            targets: B dicts with "labels" [N_b] int64 and "masks" [N_b, H', W'].

        Returns:
            B tuples (pred_indices, target_indices) of int64 tensors of length min(Q, N_b),
            sorted by pred index; target_indices[i] is matched to pred_indices[i].
        """
        cost_fn = self.cost_fn if self.cost_fn is not None else self.mask_former_cost
        num_queries = outputs["pred_logits"].shape[1]
        per_image = [k for k, v in outputs.items() if isinstance(v, Tensor)]
        indices = []
        for b, target in enumerate(targets):
            num_targets = len(target["labels"])
            if num_targets == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = cost_fn({k: outputs[k][b] for k in per_image}, target)
            if cost.shape != (num_queries, num_targets):
                raise ValueError(
                    f"HungarianMatcher: the cost of image {b} has shape {tuple(cost.shape)}, "
                    f"expected [Q, N] = [{num_queries}, {num_targets}]."
                )
            cost = cost.float().cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    f"HungarianMatcher: the matching cost of image {b} contains NaN or inf; the "
                    "predictions (pred_logits / pred_masks) are probably not finite."
                )
            # Rows are predictions: scipy returns them sorted, paired with their target columns.
            pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        if isinstance(self.cost_fn, nn.Module):
            return ""  # printed as a child module
        if self.cost_fn is not None:
            return f"cost_fn={self.cost_fn!r}"
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )


def _sample(masks: Tensor, point_coords: Tensor) -> Tensor:
    """Sample [M, H, W] masks at the same [P, 2] points: returns [M, P]."""
    coords = point_coords[None].expand(masks.shape[0], -1, -1)
    return point_sample(masks[:, None], coords, align_corners=False)[:, 0]
