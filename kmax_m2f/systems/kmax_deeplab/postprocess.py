"""kMaX-DeepLab's inference from one image's class logits [Q, K+1] and mask logits [Q, H, W]:
its masks are a k-means cluster assignment, so mask probabilities are a softmax over the queries
at every pixel."""
from typing import Optional

import torch
from detectron2.structures import Instances
from torch.nn import functional as F

from ...modeling.postprocess import is_thing, mean_inside, paint_segments, scored_instances, topk_query_class_pairs


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """kMaX-DeepLab per-class scores [K, H, W] from class logits [Q, K+1] and mask logits [Q, H, W].

    Sum over queries of p(class) x P(query | pixel), P being the softmax over queries. Summed over
    classes this is 1 minus the "no object" mass of the pixel.
    """
    class_probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", class_probs, F.softmax(mask_pred, dim=0))


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: set[int],
    *,
    pixel_confidence_threshold: float,
    class_threshold_thing: float,
    class_threshold_stuff: float,
    overlap_threshold: float,
    reorder_class_weight: float = 1.0,
    reorder_mask_weight: float = 1.0,
    inplace: bool = False,
) -> tuple[torch.Tensor, list[dict]]:
    """kMaX-DeepLab's greedy panoptic merging (the MaX-DeepLab post-processor).

    Every query proposes its most probable real class (probability p) and the pixels where its
    query-softmax probability exceeds ``pixel_confidence_threshold``. Queries are visited by
    p ** reorder_class_weight x (mean probability over their mask) ** reorder_mask_weight, best
    first. A query is pasted onto the still-free pixels of its mask if p exceeds the threshold of
    its class kind (thing / stuff) and those free pixels are more than ``overlap_threshold`` of
    its mask; otherwise it leaves no trace. Stuff masks of one class become one segment.

    Args:
        mask_cls: [Q, K+1] class logits; mask_pred: [Q, H, W] mask logits.
        thing_ids: contiguous ids of the thing classes.
        inplace: compute the probabilities in ``mask_pred``'s memory, which then holds garbage
            (for a caller that has no further use for the logits: no second [Q, H, W] tensor).

    Returns:
        panoptic_seg [H, W] int32 (0 = void) and segments_info
        [{"id", "category_id" (contiguous), "isthing", "score"}], ids 1..n in paste order; "score"
        is the ordering score of the segment's first query.
    """
    class_scores, labels = F.softmax(mask_cls, dim=-1)[:, :-1].max(-1)
    mask_probs = torch.softmax(mask_pred, dim=0, out=mask_pred) if inplace else F.softmax(mask_pred, dim=0)
    binary_masks = mask_probs > pixel_confidence_threshold
    # Neither sum makes a [Q, H, W] int64 or float copy of the binary masks (5x faster at 641 x
    # 641). Areas are counted one mask at a time (exact in any order; count_nonzero, unlike sum,
    # does not convert each mask to int64). threshold (x where x > t, else 0) is the product of
    # the probabilities with the binary masks, value for value, summed in the same order; it runs
    # in place, since the probabilities are not needed afterwards and a fresh [Q, H, W] result
    # costs more in first-touch page faults than the threshold itself.
    areas = (
        torch.stack([torch.count_nonzero(mask) for mask in binary_masks])
        if len(binary_masks)
        else mask_cls.new_zeros(0, dtype=torch.long)
    )
    masked_probs_sums = F.threshold(mask_probs, pixel_confidence_threshold, 0.0, inplace=True).flatten(1).sum(1)
    mean_mask_probs = masked_probs_sums / areas.clamp(min=1)
    reorder_scores = class_scores.pow(reorder_class_weight) * mean_mask_probs.pow(reorder_mask_weight)

    class_thresholds = torch.where(is_thing(labels, thing_ids), class_threshold_thing, class_threshold_stuff)
    # Unconfident or empty masks can never be pasted (an empty mask has no free pixel to exceed
    # any fraction of), so only the others go through the sequential loop.
    candidate = (class_scores > class_thresholds) & (areas > 0)
    order = torch.argsort(reorder_scores, descending=True, stable=True)
    order = order[candidate[order]]

    height, width = mask_pred.shape[-2:]
    owner = torch.full((height, width), -1, dtype=torch.long, device=mask_pred.device)
    # The same float32 product as the reference, so borderline masks are decided alike.
    min_free_areas = areas.float() * overlap_threshold
    pasted = []
    # Each mask's free pixels depend on which earlier masks were pasted, so this stays a loop; it
    # only queues device work (no host sync) until the decisions are read once at the end.
    for rank, query in enumerate(order.tolist()):
        free = binary_masks[query] & (owner < 0)
        paste = free.sum() > min_free_areas[query]
        owner = torch.where(free & paste, rank, owner)
        pasted.append(paste)
    accepted = torch.stack(pasted).nonzero().flatten().tolist() if pasted else []
    return paint_segments(
        owner, accepted, labels[order].tolist(), thing_ids, scores=reorder_scores[order].tolist()
    )


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    topk: int,
    pixel_confidence_threshold: float,
    thing_ids: Optional[set[int]] = None,
) -> Instances:
    """kMaX-DeepLab instances: the ``topk`` most probable (query, class) pairs.

    Masks are the pixels whose query-softmax probability exceeds ``pixel_confidence_threshold``;
    score = p(class) x mean probability inside that mask. With ``thing_ids`` (a panoptic model),
    pairs of stuff classes are dropped. Boxes are the masks' extents.

    Args:
        mask_cls: [Q, K+1] class logits; mask_pred: [Q, H, W] mask logits.

    Returns:
        Instances of up to ``topk`` entries: pred_masks [N, H, W] float, pred_boxes, scores, pred_classes.
    """
    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    scores, labels, queries = topk_query_class_pairs(class_probs, topk, thing_ids)
    mask_probs = F.softmax(mask_pred, dim=0)[queries]
    binary_masks = mask_probs > pixel_confidence_threshold
    return scored_instances(mask_pred.shape[-2:], scores, labels, mean_inside(mask_probs, binary_masks), binary_masks)
