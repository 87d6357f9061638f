"""kMaX-DeepLab's matching cost and training losses (k-means Mask Transformer, ECCV 2022).

The losses are MaX-DeepLab's PQ-style objective: after a one-to-one matching that maximises
``dice similarity x p(class)`` per image, each factor of that product is trained with the other as a
fixed weight, plus three dense auxiliary losses. Shapes: B images, N queries (mask slots), K
classes without void (the class head has K + 1 logits, the last one void), M ground-truth segments
of an image, H x W the stride-4 output resolution, L = H * W pixels, S sampled pixels.

Unlike Mask2Former's sigmoid masks, kMaX's masks compete: every pixel's mask logits go through a
softmax over the N queries, so the predicted masks partition the image like the ground truth does.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...layers.precision import at_least_float32
from ...modeling.set_criterion import Matcher, apply_loss_weights

__all__ = [
    "kMaXMatchingCost",
    "kMaXSetCriterion",
    "kmax_class_similarity",
    "kmax_mask_similarity",
]

# Dice similarity of the matching (and of the class-loss weights) adds this to its denominator;
# the dice loss itself uses a +1 smoothing instead, both as in DeepLab2.
_SIMILARITY_EPS = 1e-5
_DICE_LOSS_SMOOTH = 1.0
# Focal-style balance of the class loss (with focal gamma 0, i.e. a plain cross-entropy):
# queries matched to a segment weigh 0.75, queries whose target is void 0.25.
_CLASS_LOSS_ALPHA = 0.75
# Constant of the PyTorch port: the dice loss sums over the mask slots, divides by N and scales by
# 0.75, which is how it reproduces DeepLab2's normalisation of this term.
_DICE_LOSS_SCALE = 0.75
# Added to the sampling logit of void pixels. Finite rather than -inf so that, when fewer than S
# pixels are labelled, top-k still returns S valid indices; the void picks then add no loss.
_VOID_SAMPLE_LOGIT = -99999.0


def kmax_class_similarity(pred_logits: Tensor, labels: Tensor) -> Tensor:
    """Probability each prediction gives to each target's class.

    The softmax runs over all K + 1 logits, void included, so a query that believes in void has a
    low similarity to every segment.

    Args:
        pred_logits: [N, K+1] class logits of one image.
        labels: [M] int64 target classes in [0, K).

    Returns:
        [N, M] float32 probabilities.
    """
    return at_least_float32(pred_logits).softmax(-1)[:, labels]


def kmax_mask_similarity(mask_logits: Tensor, target_masks: Tensor, masking_void_pixel: bool = True) -> Tensor:
    """Dice similarity ``<p, t> / ((|p| + |t|) / 2 + 1e-5)`` between every predicted and every
    target mask, with p the softmax of the mask logits over the N queries.

    Args:
        mask_logits: [N, H, W] mask logits of one image.
        target_masks: [M, H, W] binary (float or bool) target masks at the same resolution.
        masking_void_pixel: zero p on the pixels no target covers, so that what a query predicts on
            unlabelled pixels (void, crowd, padding) neither helps nor hurts its similarity.

    Returns:
        [N, M] float32 similarities in [0, 1].
    """
    probs = at_least_float32(mask_logits).flatten(1).softmax(0)  # [N, L]
    targets = target_masks.flatten(1).to(probs)  # [M, L]
    if masking_void_pixel:
        probs = probs * (targets.sum(0) > 0).to(probs)
    intersection = probs @ targets.T
    mean_size = (probs.sum(1)[:, None] + targets.sum(1)[None, :]) / 2
    return intersection / (mean_size + _SIMILARITY_EPS)


class kMaXMatchingCost(nn.Module):
    """kMaX-DeepLab's matching cost ``-dice_similarity x p(class)`` for one image, to pass as
    ``HungarianMatcher(cost_fn=kMaXMatchingCost())``.

    The product (rather than a weighted sum as in Mask2Former) is the PQ of a matched pair, up to
    the soft relaxations: a match needs both a good mask and a confident class.
    """

    def __init__(self, masking_void_pixel: bool = True):
        """
        Args:
            masking_void_pixel: see :func:`kmax_mask_similarity`; use the same value as the
                criterion's.
        """
        super().__init__()
        self.masking_void_pixel = masking_void_pixel

    def forward(self, outputs: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        """
        Args:
            outputs: "pred_logits" [N, K+1] and "pred_masks" [N, H, W] (logits) of one image.
            target: "labels" [M] int64 in [0, K) and "masks" [M, H, W] at the resolution of the
                predicted masks.

        Returns:
            [N, M] float32 cost.
        """
        mask_logits, target_masks = outputs["pred_masks"], target["masks"]
        if mask_logits.shape[-2:] != target_masks.shape[-2:]:
            raise ValueError(
                f"kMaXMatchingCost: pred_masks are {tuple(mask_logits.shape[-2:])} but the target masks "
                f"{tuple(target_masks.shape[-2:])}; pad/resize the target masks to the prediction size."
            )
        # Softmax over queries and dice sums over all pixels are not exact enough in half precision.
        with torch.autocast(device_type=mask_logits.device.type, enabled=False):
            mask_similarity = kmax_mask_similarity(mask_logits, target_masks, self.masking_void_pixel)
            class_similarity = kmax_class_similarity(outputs["pred_logits"], target["labels"])
        return -mask_similarity * class_similarity

    def extra_repr(self) -> str:
        return f"masking_void_pixel={self.masking_void_pixel}"


@dataclass
class _DenseTargets:
    """The matched ground truth laid out like the predictions, plus what the losses derive from it.
    Built without gradient: the PQ-style weights are constants of the losses."""

    masks: Tensor  # [B, N, H, W] target mask of the segment matched to each query, zeros if unmatched;
    # normalised so that every labelled pixel's masks sum to 1.
    classes: Tensor  # [B, N] int64 class of the matched segment, K (void) for unmatched queries.
    class_loss_weight: Tensor  # [B, N] matched dice, or overlap with void when unmatched.
    mask_loss_weight: Tensor  # [B, N] matched p(class), 0 when unmatched.
    void: Tensor  # [B, H, W] bool, pixels that no matched segment covers.
    log_inverse_area: Tensor  # [B, H, W] log(H * W / area of the pixel's segment).
    semantic: Optional[Tensor]  # [B, H, W] int64 semantic labels, when the semantic loss needs them.


class kMaXSetCriterion(nn.Module):
    """kMaX-DeepLab's losses after a one-to-one matching of queries to ground-truth segments.

    - "labels" -> ``loss_ce``: PQ-style class term. Cross-entropy over K + 1 classes; a query
      matched to a segment targets its class, weighted 0.75 x its dice with the segment; any other
      query targets void, weighted 0.25 x the fraction of its (soft) mask lying on void pixels.
      Weights are clamped at ``eos_coef``; mean over the queries, then over the images.
    - "masks" -> ``loss_dice``: PQ-style mask term, ``1 - dice`` of the softmax-over-queries mask
      of each matched query, weighted by its matched p(class) (clamped at ``eos_coef``), summed
      over the queries, scaled by 0.75 / N and averaged over the images; and ``loss_mask``:
      mask-ID cross-entropy, i.e. per labelled pixel, softmax cross-entropy over the N queries
      with the pixel's matched query as target.
    - "pixels" -> ``loss_pixel_insdis``: pixel instance discrimination on S sampled pixels: soft
      cross-entropy between ``softmax_j(<f_i, f_j> / 0.3)`` and the uniform distribution over the
      sampled pixels of i's segment.
    - "aux_semantic" -> ``loss_aux_semantic`` (final output only): cross-entropy of the auxiliary
      semantic head on S sampled pixels, or on all pixels when ``aux_semantic_sample_k`` is 0.

    Pixels are sampled by Gumbel top-k without replacement, pixel p with probability proportional
    to ``(H * W / area(segment of p)) ** temperature``, so that small segments are not drowned out
    by large stuff regions; void pixels are drawn only when fewer than S pixels are labelled.

    Per-pixel and per-query losses are averaged per image over their non-zero entries (DeepLab2's
    convention, which skips void pixels and ignored labels), then over the images of the worker;
    nothing is exchanged across workers.

    With ``outputs["aux_outputs"]``, the first four losses are also computed for each auxiliary
    output i under the names suffixed ``_{i}``. With ``share_final_matching`` they reuse the final
    output's matching and PQ weights (one matching per step), otherwise each is matched on its own.
    The losses are returned unweighted; :meth:`weighted_losses` applies ``weight_dict``.
    """

    # Name in ``losses`` -> method computing it.
    _LOSS_METHODS = {
        "labels": "loss_labels",
        "masks": "loss_masks",
        "pixels": "loss_pixels",
        "aux_semantic": "loss_aux_semantic",
    }
    # Supervised on the final output only: the auxiliary semantic head exists once.
    _FINAL_ONLY = ("aux_semantic",)

    def __init__(
        self,
        num_classes: int,
        matcher: Matcher,
        *,
        weight_dict: dict[str, float],
        losses: list[str],
        eos_coef: float = 1e-5,
        share_final_matching: bool = True,
        pixel_insdis_temperature: float = 1.5,
        pixel_insdis_sample_k: int = 4096,
        aux_semantic_temperature: float = 2.0,
        aux_semantic_sample_k: int = 4096,
        masking_void_pixel: bool = True,
        ignore_value: int = 255,
        pixel_insdis_similarity_temperature: float = 0.3,
    ):
        """
        Args:
            num_classes: K, things + stuff, without void.
            matcher: computes the matching, normally ``HungarianMatcher(cost_fn=kMaXMatchingCost())``.
            weight_dict: loss name -> weight, used by :meth:`weighted_losses` (see
                ``build_weight_dict``).
            losses: which losses to compute, among "labels", "masks", "pixels", "aux_semantic".
            eos_coef: lower bound of the PQ-style weights (MODEL.KMAX_DEEPLAB.NO_OBJECT_WEIGHT),
                so no query's class or mask loss vanishes entirely.
            share_final_matching: reuse the final output's matching for the auxiliary outputs.
            pixel_insdis_temperature: sampling temperature of the instance discrimination pixels
                (1.5 COCO, 0.6 Cityscapes); 0 samples labelled pixels uniformly.
            pixel_insdis_sample_k: pixels sampled per image for instance discrimination (at most
                H * W are taken).
            aux_semantic_temperature: sampling temperature of the semantic loss pixels.
            aux_semantic_sample_k: pixels sampled per image for the semantic loss; 0 uses every
                pixel (plain cross-entropy).
            masking_void_pixel: ignore the predicted masks on void pixels in the dice terms; must
                equal the matching cost's.
            ignore_value: label of unlabelled pixels in the targets' "semantic_masks".
            pixel_insdis_similarity_temperature: divides the feature similarities of instance
                discrimination (0.3 in the official code, where it is hard-coded).
        """
        super().__init__()
        unknown = [name for name in losses if name not in self._LOSS_METHODS]
        if unknown:
            raise ValueError(f"kMaXSetCriterion: unknown losses {unknown}; available: {list(self._LOSS_METHODS)}.")
        if pixel_insdis_sample_k <= 0 and "pixels" in losses:
            raise ValueError(f"kMaXSetCriterion: pixel_insdis_sample_k must be positive, got {pixel_insdis_sample_k}.")
        if aux_semantic_sample_k < 0:
            raise ValueError(
                f"kMaXSetCriterion: aux_semantic_sample_k must be >= 0 (0: all pixels), got {aux_semantic_sample_k}."
            )
        cost_fn = getattr(matcher, "cost_fn", None)
        if isinstance(cost_fn, kMaXMatchingCost) and cost_fn.masking_void_pixel != masking_void_pixel:
            raise ValueError(
                f"kMaXSetCriterion: masking_void_pixel={masking_void_pixel} but the matcher's cost uses "
                f"{cost_fn.masking_void_pixel}; build both from MODEL.KMAX_DEEPLAB.MASKING_VOID_PIXEL."
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = list(losses)
        self.eos_coef = eos_coef
        self.share_final_matching = share_final_matching
        self.pixel_insdis_temperature = pixel_insdis_temperature
        self.pixel_insdis_sample_k = pixel_insdis_sample_k
        self.aux_semantic_temperature = aux_semantic_temperature
        self.aux_semantic_sample_k = aux_semantic_sample_k
        self.masking_void_pixel = masking_void_pixel
        self.ignore_value = ignore_value
        self.pixel_insdis_similarity_temperature = pixel_insdis_similarity_temperature

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """
        Args:
            outputs: "pred_logits" [B, N, K+1], "pred_masks" [B, N, H, W] (logits),
                "pixel_feature" [B, D, H, W] (L2-normalised; for "pixels"), "aux_semantic_pred"
                [B, K+1 or K, H, W] (for "aux_semantic"; may also be at a coarser resolution
                aligned with H x W, i.e. (H - 1) / (h - 1) = (W - 1) / (w - 1) an integer), and
                optionally "aux_outputs": a list of dicts with the first three entries.
            targets: B dicts with "labels" [M_b] int64 in [0, K), "masks" [M_b, H, W] binary
                non-overlapping segments (pixels in none are void), and "semantic_masks" [H, W]
                int64 in [0, K) or ``ignore_value`` (for "aux_semantic"). M_b may be 0.

        Returns:
            Unweighted scalar losses: "loss_ce", "loss_dice", "loss_mask", "loss_pixel_insdis",
            "loss_aux_semantic" (those requested) and, for auxiliary output i, the first four
            suffixed "_{i}".
        """
        final_outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        aux_outputs = outputs.get("aux_outputs", [])
        self._check_targets(final_outputs, targets)
        for name, out in [("outputs", final_outputs)] + [(f"aux_outputs[{i}]", o) for i, o in enumerate(aux_outputs)]:
            self._check_outputs(name, out, targets, final=out is final_outputs)

        # Softmaxes over clusters and sums over pixels in float32 even under autocast: every
        # output is promoted here, once, and autocast is off for the losses.
        final_outputs = _promote(final_outputs)
        aux_outputs = [_promote(aux) for aux in aux_outputs]
        device = final_outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            dense = self._match(final_outputs, targets, with_semantic="aux_semantic" in self.losses)
            losses = self._compute(final_outputs, dense, final=True)
            for i, aux in enumerate(aux_outputs):
                if not self.share_final_matching:
                    dense = self._match(aux, targets, with_semantic=False)
                losses.update({f"{name}_{i}": value for name, value in self._compute(aux, dense, final=False).items()})
        return losses

    def weighted_losses(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """See :func:`apply_loss_weights`."""
        return apply_loss_weights(losses, self.weight_dict, type(self).__name__)

    def loss_labels(self, outputs: dict[str, Tensor], dense: _DenseTargets) -> dict[str, Tensor]:
        """PQ-style class term on "pred_logits" [B, N, K+1]."""
        logits = outputs["pred_logits"]
        cross_entropy = F.cross_entropy(logits.transpose(1, 2), dense.classes, reduction="none")  # [B, N]
        alpha = torch.where(dense.classes == self.num_classes, 1 - _CLASS_LOSS_ALPHA, _CLASS_LOSS_ALPHA)
        return {"loss_ce": _mean_of_nonzero(cross_entropy * alpha * dense.class_loss_weight)}

    def loss_masks(self, outputs: dict[str, Tensor], dense: _DenseTargets) -> dict[str, Tensor]:
        """PQ-style dice term and mask-ID cross-entropy on "pred_masks" [B, N, H, W]."""
        logits = outputs["pred_masks"].flatten(2)  # [B, N, L]
        targets = dense.masks.flatten(2)
        void = dense.void.flatten(1)  # [B, L]

        # Void pixels have an all-zero target and hence zero loss already; the fill also keeps them
        # out of the non-zero count.
        probs, log_probs = _softmax_and_log_softmax(logits)
        mask_id_ce = -(targets * log_probs).sum(1).masked_fill(void, 0.0)  # [B, L]

        if self.masking_void_pixel:
            probs = probs.masked_fill(void[:, None], 0.0)
        dice = (2 * (probs * targets).sum(-1) + _DICE_LOSS_SMOOTH) / (
            probs.sum(-1) + targets.sum(-1) + _DICE_LOSS_SMOOTH
        )  # [B, N]
        # Unmatched queries have weight 0: the class term already pushes them to void.
        dice_loss = ((1 - dice) * dense.mask_loss_weight).sum(1) * (_DICE_LOSS_SCALE / logits.shape[1])
        return {"loss_mask": _mean_of_nonzero(mask_id_ce), "loss_dice": dice_loss.mean()}

    def loss_pixels(self, outputs: dict[str, Tensor], dense: _DenseTargets) -> dict[str, Tensor]:
        """Pixel instance discrimination on "pixel_feature" [B, D, H, W]."""
        features = outputs["pixel_feature"].flatten(2)  # [B, D, L]
        masks = dense.masks.flatten(2)  # [B, N, L]
        with torch.no_grad():
            index = _sample_pixels(
                dense.void, dense.log_inverse_area, self.pixel_insdis_temperature, self.pixel_insdis_sample_k
            )  # [B, S]
            sampled_masks = masks.gather(2, index[:, None].expand(-1, masks.shape[1], -1))  # [B, N, S]
            # Sampled pixels sharing each pixel's segment (itself included); 0 on void pixels.
            segment_size = (sampled_masks.transpose(1, 2) @ sampled_masks.sum(-1, keepdim=True)).squeeze(-1)  # [B, S]
        sampled = _pixels_at(features, index)  # [B, D, S]
        temperature = self.pixel_insdis_similarity_temperature
        # The soft cross-entropy against target t_ij = same_segment_ij / segment_size_i, without
        # any S x S matrix kept for the backward pass (7 outputs x B images x 4096^2 floats would
        # be gigabytes):
        #   -sum_j t_ij log_softmax_j(s_ij) = rowsum(t)_i * logsumexp_j(s_ij) - sum_j t_ij s_ij,
        # where sum_j t_ij s_ij = <f_i, mean of the sampled features of i's segment> / T comes
        # from per-segment sums ([B, N, D]), and the logsumexp is recomputed in the backward pass.
        segment_sums = sampled_masks @ sampled.transpose(1, 2)  # [B, N, D]
        same_segment_sums = sampled_masks.transpose(1, 2) @ segment_sums  # [B, S, D]
        labelled = (segment_size > 0).to(sampled.dtype)  # [B, S]
        target_term = (sampled.transpose(1, 2) * same_segment_sums).sum(-1) / segment_size.clamp(min=1.0)
        log_partition = checkpoint(_similarity_logsumexp, sampled, temperature, use_reentrant=False)  # [B, S]
        loss = labelled * log_partition - target_term / temperature
        return {"loss_pixel_insdis": _mean_of_nonzero(loss)}

    def loss_aux_semantic(self, outputs: dict[str, Tensor], dense: _DenseTargets) -> dict[str, Tensor]:
        """Cross-entropy of "aux_semantic_pred" [B, C, h, w] (C = K + 1 or K; a void channel is
        never a target) against the targets' "semantic_masks"."""
        logits = outputs["aux_semantic_pred"]
        semantic, void, log_inverse_area = dense.semantic, dense.void, dense.log_inverse_area
        height = logits.shape[-2]
        if logits.shape[-2:] != semantic.shape[-2:]:
            # Coarser prediction: read the targets at its pixels (TF corner-aligned grid).
            stride = (semantic.shape[-2] - 1) // (height - 1)
            semantic, void, log_inverse_area = (x[:, ::stride, ::stride] for x in (semantic, void, log_inverse_area))
        logits = logits.flatten(2)  # [B, C, l]
        semantic = semantic.flatten(1)  # [B, l]
        if self.aux_semantic_sample_k > 0:
            with torch.no_grad():
                index = _sample_pixels(
                    void, log_inverse_area, self.aux_semantic_temperature, self.aux_semantic_sample_k
                )
            semantic = semantic.gather(1, index)
            logits = _pixels_at(logits, index)
        loss = F.cross_entropy(logits, semantic, ignore_index=self.ignore_value, reduction="none")  # [B, S]
        return {"loss_aux_semantic": _mean_of_nonzero(loss)}

    @torch.no_grad()
    def _match(
        self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], with_semantic: bool
    ) -> _DenseTargets:
        """Match ``outputs`` (one output, no "aux_outputs") to the targets and lay the result out
        per query and per pixel."""
        indices = self.matcher(outputs, targets)
        mask_logits = outputs["pred_masks"].detach()  # [B, N, H, W]
        class_logits = outputs["pred_logits"].detach()
        batch, num_queries, height, width = mask_logits.shape
        device = mask_logits.device

        masks = torch.zeros_like(mask_logits)
        classes = torch.full((batch, num_queries), self.num_classes, dtype=torch.int64, device=device)
        mask_loss_weight = torch.zeros(batch, num_queries, device=device)
        matched_dice = []  # (image, queries, dice) to write once the void weights are known
        for b, (target, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices)):
            if len(pred_idx) == 0:
                continue
            pred_idx, tgt_idx = pred_idx.to(device), tgt_idx.to(device)
            target_masks = target["masks"].to(device=device, dtype=mask_logits.dtype)
            labels = target["labels"].to(device)
            masks[b, pred_idx] = target_masks[tgt_idx]
            classes[b, pred_idx] = labels[tgt_idx]
            # The weights are the two factors of the matched pairs' cost, recomputed here because
            # the matcher only returns indices.
            dice = kmax_mask_similarity(mask_logits[b], target_masks, self.masking_void_pixel)[pred_idx, tgt_idx]
            class_prob = kmax_class_similarity(class_logits[b], labels)[pred_idx, tgt_idx]
            mask_loss_weight[b, pred_idx] = class_prob.clamp(min=self.eos_coef)
            matched_dice.append((b, pred_idx, dice))

        coverage = masks.sum(1)  # [B, H, W]
        # Segments left unmatched (more segments than queries) count as void, like unlabelled pixels.
        void = coverage == 0
        masks = masks / coverage.clamp(min=1.0)[:, None]

        # An unmatched query should predict void, more strongly the more its mask already lies on
        # void pixels: its weight is the share of its soft mask (softmax over queries) there.
        probs = mask_logits.flatten(2).softmax(1)  # [B, N, L]
        void_overlap = (probs * void.flatten(1)[:, None].to(probs)).sum(-1) / (probs.sum(-1) + _SIMILARITY_EPS)
        for b, pred_idx, dice in matched_dice:
            void_overlap[b, pred_idx] = dice
        class_loss_weight = void_overlap.clamp(min=self.eos_coef)

        area = masks.sum((2, 3))  # [B, N]
        pixel_area = torch.einsum("bnhw,bn->bhw", masks, area)
        log_inverse_area = torch.log(height * width / pixel_area.clamp(min=1.0))

        semantic = None
        if with_semantic:
            semantic = torch.stack([t["semantic_masks"] for t in targets]).to(device=device, dtype=torch.int64)
        return _DenseTargets(
            masks=masks,
            classes=classes,
            class_loss_weight=class_loss_weight,
            mask_loss_weight=mask_loss_weight,
            void=void,
            log_inverse_area=log_inverse_area,
            semantic=semantic,
        )

    def _compute(self, outputs: dict[str, Tensor], dense: _DenseTargets, final: bool) -> dict[str, Tensor]:
        losses = {}
        for name in self.losses:
            if final or name not in self._FINAL_ONLY:
                losses.update(getattr(self, self._LOSS_METHODS[name])(outputs, dense))
        return losses

    def _check_targets(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> None:
        """Fail with a readable message where indexing would fail with an opaque one (a
        device-side assert on GPU) or broadcasting would silently compute nonsense."""
        batch = outputs["pred_logits"].shape[0]
        if len(targets) != batch:
            raise ValueError(f"kMaXSetCriterion: {len(targets)} targets for a batch of {batch} images.")
        height, width = outputs["pred_masks"].shape[-2:]
        for b, t in enumerate(targets):
            labels, masks = t["labels"], t["masks"]
            if masks.dim() != 3 or len(labels) != len(masks):
                raise ValueError(
                    f"kMaXSetCriterion: image {b} has {len(labels)} labels and masks of shape "
                    f"{tuple(masks.shape)}; expected masks [M, H, W] with M = {len(labels)}."
                )
            if masks.shape[-2:] != (height, width):
                raise ValueError(
                    f"kMaXSetCriterion: the target masks of image {b} are {tuple(masks.shape[-2:])} but "
                    f"pred_masks are {(height, width)}; pad and downsample the targets to the prediction "
                    "size (stride 4 of the padded input) before the criterion."
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"kMaXSetCriterion: image {b} has labels in [{int(labels.min())}, {int(labels.max())}], "
                    f"outside [0, {self.num_classes}) (check MODEL.SEM_SEG_HEAD.NUM_CLASSES and the "
                    "dataset's category ids)."
                )
            if "aux_semantic" in self.losses:
                self._check_semantic(b, t, height, width)

    def _check_semantic(self, b: int, target: dict[str, Tensor], height: int, width: int) -> None:
        if "semantic_masks" not in target:
            raise ValueError(
                f"kMaXSetCriterion: the 'aux_semantic' loss needs 'semantic_masks' in the targets, "
                f"image {b} has none (or set MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_WEIGHT to 0)."
            )
        semantic = target["semantic_masks"]
        if semantic.shape != (height, width):
            raise ValueError(
                f"kMaXSetCriterion: 'semantic_masks' of image {b} is {tuple(semantic.shape)}, expected "
                f"[H, W] = {[height, width]} like the target masks."
            )
        invalid = (semantic != self.ignore_value) & ((semantic < 0) | (semantic >= self.num_classes))
        if invalid.any():
            bad = semantic[invalid].unique().tolist()[:10]
            raise ValueError(
                f"kMaXSetCriterion: 'semantic_masks' of image {b} has labels {bad} outside [0, {self.num_classes}) "
                f"that are not the ignore value {self.ignore_value} (check MODEL.SEM_SEG_HEAD.IGNORE_VALUE)."
            )

    def _check_outputs(
        self, name: str, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], final: bool
    ) -> None:
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if logits.dim() != 3 or logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"kMaXSetCriterion: {name}['pred_logits'] is {tuple(logits.shape)}, expected [B, N, K+1] with "
                f"K + 1 = {self.num_classes + 1} (check MODEL.SEM_SEG_HEAD.NUM_CLASSES)."
            )
        if masks.dim() != 4 or masks.shape[:2] != logits.shape[:2]:
            raise ValueError(
                f"kMaXSetCriterion: {name}['pred_masks'] is {tuple(masks.shape)}, expected [B, N, H, W] with "
                f"[B, N] = {list(logits.shape[:2])} as in pred_logits."
            )
        size = tuple(targets[0]["masks"].shape[-2:]) if targets else tuple(masks.shape[-2:])
        if tuple(masks.shape[-2:]) != size:
            raise ValueError(
                f"kMaXSetCriterion: {name}['pred_masks'] are {tuple(masks.shape[-2:])} but the target masks "
                f"{size}; resize every auxiliary prediction to the final mask resolution."
            )
        if "pixels" in self.losses:
            features = outputs.get("pixel_feature")
            if (
                features is None
                or features.dim() != 4
                or features.shape[0] != masks.shape[0]
                or features.shape[-2:] != masks.shape[-2:]
            ):
                shape = None if features is None else tuple(features.shape)
                raise ValueError(
                    f"kMaXSetCriterion: the 'pixels' loss needs {name}['pixel_feature'] [B, D, H, W] with "
                    f"B, H, W = {masks.shape[0]}, {masks.shape[2]}, {masks.shape[3]}; got {shape}."
                )
        if final and "aux_semantic" in self.losses:
            self._check_aux_semantic(outputs, masks.shape[-2:])

    def _check_aux_semantic(self, outputs: dict[str, Tensor], size: torch.Size) -> None:
        pred = outputs.get("aux_semantic_pred")
        if pred is None:
            raise ValueError(
                "kMaXSetCriterion: the 'aux_semantic' loss needs outputs['aux_semantic_pred'] (or set "
                "MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_WEIGHT to 0)."
            )
        if pred.dim() != 4 or pred.shape[1] not in (self.num_classes, self.num_classes + 1):
            raise ValueError(
                f"kMaXSetCriterion: aux_semantic_pred is {tuple(pred.shape)}, expected [B, K+1 or K, H, W] "
                f"with K = {self.num_classes}."
            )
        (height, width), (h, w) = size, pred.shape[-2:]
        if (h, w) == (height, width):
            return
        # Reading the targets every (H - 1) / (h - 1) pixels is right only on TF's corner-aligned
        # grid of odd sizes (input k * stride + 1): on even sizes the coarse pixel centres fall
        # between target pixels, and an integer ratio there (64 targets, 8 predictions: 9) is a
        # coincidence.
        aligned = (
            h > 1 and w > 1 and all(n % 2 == 1 for n in (height, width, h, w))
            and (height - 1) % (h - 1) == 0 and (width - 1) % (w - 1) == 0
        )
        if not aligned or (height - 1) // (h - 1) != (width - 1) // (w - 1):
            raise ValueError(
                f"kMaXSetCriterion: aux_semantic_pred is {(h, w)} and the targets {(height, width)}; resize "
                "the prediction to the target size, or use a corner-aligned size: odd sizes with "
                "(H - 1) / (h - 1) = (W - 1) / (w - 1) an integer stride (an INPUT.IMAGE_SIZE of k x 32 + 1, "
                "e.g. 1025 x 2049, for the light semantic head, MODEL.KMAX_DEEPLAB.USE_AUX_SEMANTIC_DECODER False)."
            )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, eos_coef={self.eos_coef}, "
            f"share_final_matching={self.share_final_matching}, "
            f"pixel_insdis_temperature={self.pixel_insdis_temperature}, "
            f"pixel_insdis_sample_k={self.pixel_insdis_sample_k}, "
            f"pixel_insdis_similarity_temperature={self.pixel_insdis_similarity_temperature}, "
            f"aux_semantic_temperature={self.aux_semantic_temperature}, "
            f"aux_semantic_sample_k={self.aux_semantic_sample_k}, "
            f"masking_void_pixel={self.masking_void_pixel}, ignore_value={self.ignore_value}, "
            f"weight_dict={self.weight_dict}"
        )


def _promote(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: at_least_float32(v) if isinstance(v, Tensor) else v for k, v in outputs.items()}


class _SoftmaxAndLogSoftmax(torch.autograd.Function):
    """(softmax, log_softmax) over dim 1 of [B, N, L] logits, keeping only the softmax for the
    backward pass.

    The mask losses need both; computed apart, autograd keeps each result, one [B, N, L] map more
    per output (7 outputs x 25 MiB for the R50 at 641x641, batch 2). Both gradients need only the
    softmax p: for upstream gradients g_p and g_log,
        dL/dz = p * (g_p - sum_n p g_p) + g_log - p * sum_n g_log.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> tuple[Tensor, Tensor]:
        log_probs = logits.log_softmax(1)
        probs = logits.softmax(1)
        ctx.save_for_backward(probs)
        return probs, log_probs

    @staticmethod
    def backward(ctx, grad_probs: Optional[Tensor], grad_log_probs: Optional[Tensor]) -> Tensor:
        (probs,) = ctx.saved_tensors
        grad_logits = torch.zeros_like(probs)
        if grad_probs is not None:
            grad_logits += probs * (grad_probs - (probs * grad_probs).sum(1, keepdim=True))
        if grad_log_probs is not None:
            grad_logits += grad_log_probs - probs * grad_log_probs.sum(1, keepdim=True)
        return grad_logits


def _softmax_and_log_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """[B, N, L] logits -> (softmax, log_softmax) over N, with one [B, N, L] map kept for backward."""
    return _SoftmaxAndLogSoftmax.apply(logits)


def _pixels_at(values: Tensor, index: Tensor) -> Tensor:
    """``values`` [B, C, L] at the pixels ``index`` [B, S] -> [B, C, S].

    Indexing rather than ``gather``: gather's backward keeps its whole input, here a
    full-resolution map per output kept only to be sampled at S pixels; indexing keeps the index.
    """
    batch_index = torch.arange(values.shape[0], device=values.device)[:, None]
    return values[batch_index, :, index].transpose(1, 2)


def _similarity_logsumexp(features: Tensor, temperature: float) -> Tensor:
    """[B, D, S] features -> [B, S]: logsumexp_j(<f_i, f_j> / temperature)."""
    return torch.logsumexp(features.transpose(1, 2) @ features / temperature, dim=-1)


def _mean_of_nonzero(loss: Tensor) -> Tensor:
    """[B, X] -> scalar: per image, the sum over the non-zero entries divided by their number (at
    least 1), then the mean over images. Unlike the official ``divide_no_nan``, a NaN loss stays
    NaN so that detectron2's trainer reports it instead of training on silently zeroed losses."""
    count = (loss != 0).sum(1).clamp(min=1)
    return (loss.sum(1) / count).mean()


def _sample_pixels(void: Tensor, log_inverse_area: Tensor, temperature: float, num_samples: int) -> Tensor:
    """[B, S] flat pixel indices, S = min(num_samples, H * W), drawn without replacement with
    probabilities proportional to ``(H * W / segment area) ** temperature`` among the labelled pixels.

    Args:
        void: [B, H, W] bool, pixels to draw only once the labelled ones run out.
        log_inverse_area: [B, H, W] log(H * W / area of the pixel's segment).
    """
    logits = log_inverse_area.flatten(1) * temperature + void.flatten(1).to(log_inverse_area) * _VOID_SAMPLE_LOGIT
    return _gumbel_top_k(logits, min(num_samples, logits.shape[1]))


def _gumbel_top_k(logits: Tensor, k: int) -> Tensor:
    """[B, L] logits -> [B, k] indices drawn without replacement from softmax(logits) (the
    Gumbel-top-k trick: the top k of logits + Gumbel noise)."""
    # -log(-log(U)) with U uniform is Gumbel(0, 1), drawn from the uniform stream as the official
    # code does (so that a seeded run samples the same pixels); a rare U = 0 gives -inf, which
    # merely leaves that pixel out.
    gumbel = -torch.log(-torch.log(torch.rand_like(logits)))
    return (logits + gumbel).topk(k, dim=1).indices
