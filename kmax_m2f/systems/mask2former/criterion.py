"""Mask2Former's set criterion: Hungarian matching, then class cross-entropy and point-sampled mask
losses (PointRend importance sampling), for the final output and every auxiliary output."""

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from torch import Tensor, nn

from ...layers.precision import at_least_float32
from ...modeling.losses import calculate_uncertainty, dice_loss, sigmoid_ce_loss
from ...modeling.set_criterion import Matcher, apply_loss_weights, num_masks_across_workers

__all__ = ["SetCriterion"]

class SetCriterion(nn.Module):
    """Mask2Former's losses after a one-to-one matching of predictions to targets.

    - "labels" -> ``loss_ce``: cross-entropy over K+1 classes, the no-object class weighted
      ``eos_coef``; unmatched predictions target the no-object class (index K).
    - "masks" -> ``loss_mask`` (sigmoid BCE) and ``loss_dice`` between each matched prediction
      and its target on ``num_points`` points chosen by PointRend importance sampling, each
      normalised by the number of target masks averaged across workers.

    With ``outputs["aux_outputs"]`` (a list of output dicts), the matching is redone for each and
    its losses are added with the suffix ``_{i}``. The losses are returned unweighted, as in the
    official code: the meta-architecture weights them, e.g. with :meth:`weighted_losses`.
    """

    # Name in ``losses`` -> method computing it.
    _LOSS_METHODS = {"labels": "loss_labels", "masks": "loss_masks"}

    def __init__(
        self,
        num_classes: int,
        matcher: Matcher,
        weight_dict: dict[str, float],
        eos_coef: float,
        losses: list[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
    ):
        """
        Args:
            num_classes: K, the number of categories without the no-object class.
            matcher: computes the matching, e.g. a ``HungarianMatcher``.
            weight_dict: loss name -> weight, used by :meth:`weighted_losses` (see
                :func:`build_weight_dict`).
            eos_coef: cross-entropy weight of the no-object class.
            losses: which losses to compute, among "labels" and "masks".
            num_points: points per mask for the mask losses.
            oversample_ratio: PointRend candidate points per kept point (>= 1).
            importance_sample_ratio: fraction of the points taken among the most uncertain
                candidates; the rest are uniform random.
        """
        super().__init__()
        unknown = [name for name in losses if name not in self._LOSS_METHODS]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; available: {list(self._LOSS_METHODS)}.")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        # A buffer (not a constant) so it follows .to(device) and matches the official checkpoints'
        # "criterion.empty_weight".
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(
        self,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> dict[str, Tensor]:
        """Class cross-entropy over all [B, Q] predictions ("pred_logits" [B, Q, K+1]).
        ``num_masks`` is unused: the weighted mean over predictions is the normalisation."""
        logits = at_least_float32(outputs["pred_logits"])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[_pred_index(indices)] = torch.cat(
            [t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]
        ).to(logits.device)
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}

    def loss_masks(
        self,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> dict[str, Tensor]:
        """Sigmoid BCE and Dice between matched "pred_masks" [B, Q, H, W] and target "masks"
        [N_b, H', W'] on points of :meth:`sample_points`. Target masks may have any resolution:
        both are read at the same normalised [0, 1]^2 coordinates."""
        pred_masks = outputs["pred_masks"]
        pred_index = _pred_index(indices)
        if pred_index[0].numel() == 0:
            # No target in the batch: zero losses that still reach every mask parameter, so that
            # DDP finds a gradient for each of them.
            return {"loss_mask": pred_masks.sum() * 0.0, "loss_dice": pred_masks.sum() * 0.0}

        matched = at_least_float32(pred_masks[pred_index])[:, None]  # [M, 1, H, W]
        with torch.no_grad():
            point_coords = self.sample_points(matched)  # [M, P, 2]
            # Sampled per image, since images' target masks may differ in size.
            per_image_coords = point_coords.split([len(pred) for pred, _ in indices])
            point_labels = torch.cat(
                [
                    point_sample(
                        t["masks"][tgt].to(device=matched.device, dtype=matched.dtype)[:, None],
                        coords,
                        align_corners=False,
                    )[:, 0]
                    for t, (_, tgt), coords in zip(targets, indices, per_image_coords)
                ]
            )  # [M, P]
        point_logits = point_sample(matched, point_coords, align_corners=False)[:, 0]  # [M, P]
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def sample_points(self, mask_logits: Tensor) -> Tensor:
        """Where the mask losses look: PointRend importance sampling of ``num_points`` points per
        mask, ``importance_sample_ratio`` of them the most uncertain (logit nearest 0) among
        ``oversample_ratio`` x as many uniform candidates, the rest uniform.

        Args:
            mask_logits: [M, 1, H, W] matched predicted mask logits.

        Returns:
            [M, P, 2] points (x, y) in [0, 1]^2.
        """
        return get_uncertain_point_coords_with_randomness(
            mask_logits,
            calculate_uncertainty,
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
        )

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """
        Args:
            outputs: "pred_logits" [B, Q, K+1], "pred_masks" [B, Q, H, W] (logits), optionally
                "aux_outputs": a list of dicts with the same two entries.
            targets: B dicts with "labels" [N_b] int64 in [0, K) and "masks" [N_b, H', W'];
                N_b may be 0.

        Returns:
            Unweighted losses: "loss_ce", "loss_mask", "loss_dice" (those requested) and, for
            auxiliary output i, the same names suffixed "_{i}".
        """
        self._check_inputs(outputs, targets)
        num_masks = num_masks_across_workers(targets, outputs["pred_logits"].device)
        losses = self._match_and_compute(outputs, targets, num_masks)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._match_and_compute(aux_outputs, targets, num_masks)
            losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        return losses

    def weighted_losses(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """See :func:`apply_loss_weights`."""
        return apply_loss_weights(losses, self.weight_dict, type(self).__name__)

    def _match_and_compute(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], num_masks: float
    ) -> dict[str, Tensor]:
        outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            losses.update(getattr(self, self._LOSS_METHODS[name])(outputs, targets, indices, num_masks))
        return losses

    def _check_inputs(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> None:
        """Fail with a readable message where indexing would fail with an opaque one (a
        device-side assert on GPU)."""
        num_logits = outputs["pred_logits"].shape[-1]
        if num_logits != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion: pred_logits have {num_logits} classes, expected num_classes + 1 = "
                f"{self.num_classes + 1} (check MODEL.SEM_SEG_HEAD.NUM_CLASSES)."
            )
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(
                f"SetCriterion: {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} images."
            )
        for b, t in enumerate(targets):
            labels = t["labels"]
            if len(labels) != len(t["masks"]):
                raise ValueError(f"SetCriterion: image {b} has {len(labels)} labels but {len(t['masks'])} masks.")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"SetCriterion: image {b} has labels in [{int(labels.min())}, {int(labels.max())}], "
                    f"outside [0, {self.num_classes}) (check MODEL.SEM_SEG_HEAD.NUM_CLASSES and the "
                    "dataset's category ids)."
                )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"weight_dict={self.weight_dict}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, importance_sample_ratio={self.importance_sample_ratio}"
        )


def _pred_index(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched prediction, image by image: indexes [B, Q, ...]."""
    batch = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(indices)])
    query = torch.cat([pred for pred, _ in indices])
    return batch, query
