"""Turning per-query class and mask predictions into semantic, panoptic and instance results.

Shared by the mask-classification meta-architectures. Inputs are one image's predictions:
class logits [Q, K+1] (the last class is "no object") and mask logits [Q, H, W].

Mask2Former reads each query's mask on its own (sigmoid); kMaX-DeepLab's masks are a k-means
cluster assignment, so its mask probabilities are a softmax over the queries at every pixel.
"""
from typing import Optional

import torch
from detectron2.structures import Boxes, Instances
from torch.nn import functional as F


def _is_thing(labels: torch.Tensor, thing_ids: set[int]) -> torch.Tensor:
    """Bool tensor shaped like ``labels``: which contiguous class ids are thing classes."""
    return torch.isin(labels, torch.tensor(sorted(thing_ids), dtype=labels.dtype, device=labels.device))


def _paint_segments(
    owner: torch.Tensor,
    accepted: list[int],
    labels: list[int],
    thing_ids: set[int],
    scores: Optional[list[float]] = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Numbers the accepted segments and paints them.

    Segment ids 1, 2, ... are handed out in the order of ``accepted``; the accepted stuff masks of
    one class all get the id of the first one, so every stuff class forms one segment.

    Args:
        owner: [H, W] int64, index (into ``labels``) of the mask each pixel was given to, -1 for none.
            Pixels of a mask that is not in ``accepted`` become void.
        accepted: mask indices, in paste order.
        labels: contiguous class id of every mask.
        scores: if given, a "score" per segment (its first mask's) is added to segments_info.

    Returns:
        panoptic_seg [H, W] int32 (0 = void) and segments_info [{"id", "isthing", "category_id"}].
    """
    segment_of_mask = [0] * (len(labels) + 1)  # shifted by one so that owner -1 reads void
    segments_info: list[dict] = []
    stuff_segment_of_class: dict[int, int] = {}
    for index in accepted:
        label = labels[index]
        isthing = label in thing_ids
        if not isthing and label in stuff_segment_of_class:
            segment_of_mask[index + 1] = stuff_segment_of_class[label]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment_of_class[label] = segment_id
        segment_of_mask[index + 1] = segment_id
        info = {"id": segment_id, "isthing": bool(isthing), "category_id": int(label)}
        if scores is not None:
            info["score"] = float(scores[index])
        segments_info.append(info)
    lookup = torch.tensor(segment_of_mask, dtype=torch.int32, device=owner.device)
    return lookup[owner + 1], segments_info


def _boxes_from_masks(masks: torch.Tensor) -> Boxes:
    """Tight XYXY boxes of [N, H, W] bool masks (all zero for an empty mask), without a per-mask loop."""
    height, width = masks.shape[-2:]
    rows, cols = masks.any(2), masks.any(1)  # [N, H], [N, W]
    # argmax returns the first maximum: the first occupied row / column from either side.
    x0 = cols.int().argmax(1)
    x1 = width - cols.flip(1).int().argmax(1)
    y0 = rows.int().argmax(1)
    y1 = height - rows.flip(1).int().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return Boxes(boxes * cols.any(1, keepdim=True))


def _topk_query_class_pairs(
    class_probs: torch.Tensor, topk: int, thing_ids: Optional[set[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``topk`` most probable (query, class) pairs of [Q, K] ``class_probs``.

    With ``thing_ids`` (a panoptic model) the pairs of stuff classes are dropped afterwards, so
    fewer than ``topk`` may remain. Returns class probabilities, class ids and query indices [N].
    """
    num_classes = class_probs.shape[-1]
    scores, flat_indices = class_probs.flatten().topk(min(topk, class_probs.numel()), sorted=False)
    labels = flat_indices % num_classes
    queries = torch.div(flat_indices, num_classes, rounding_mode="floor")
    if thing_ids is not None:
        keep = _is_thing(labels, thing_ids)
        scores, labels, queries = scores[keep], labels[keep], queries[keep]
    return scores, labels, queries


def _instances(
    image_size: tuple[int, int],
    class_scores: torch.Tensor,
    labels: torch.Tensor,
    mask_probs: torch.Tensor,
    binary_masks: torch.Tensor,
) -> Instances:
    """Instances scored by class probability x mean mask probability inside the binary mask.

    Args:
        class_scores, labels: [N].
        mask_probs: [N, H, W] float; binary_masks: [N, H, W] bool.
    """
    result = Instances(image_size)
    result.pred_masks = binary_masks.float()
    result.pred_boxes = _boxes_from_masks(binary_masks)
    inside = binary_masks.flatten(1)
    mask_scores = (mask_probs.flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    result.scores = class_scores * mask_scores
    result.pred_classes = labels
    return result


def semantic_inference(
    mask_cls: torch.Tensor, mask_pred: torch.Tensor, mask_probs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """[K, H, W] per-class scores: sum over queries of p(class) x sigmoid(mask).

    ``mask_probs``: ``mask_pred.sigmoid()`` if the caller has it already (it is the largest tensor
    of inference at full resolution; the three outputs share one).
    """
    class_probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", class_probs, mask_pred.sigmoid() if mask_probs is None else mask_probs)


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: set[int],
    object_mask_threshold: float,
    overlap_threshold: float,
    mask_probs: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Non-overlapping segments from the confident queries.

    Queries whose top class is not "no object" and whose score exceeds ``object_mask_threshold``
    compete for pixels by score x mask probability. A query keeps its pixels only if they are at
    least ``overlap_threshold`` of its own mask (mask >= 0.5); stuff queries of one class merge.

    Args:
        thing_ids: contiguous ids of the thing classes.
        mask_probs: ``mask_pred.sigmoid()``, if the caller has it already.

    Returns:
        panoptic_seg [H, W] int32 (0 = void) and segments_info
        [{"id", "category_id" (contiguous), "isthing"}], as COCOPanopticEvaluator reads them.
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    masks = mask_pred[keep].sigmoid() if mask_probs is None else mask_probs[keep]
    scores, labels = scores[keep], labels[keep]

    height, width = mask_pred.shape[-2:]
    if masks.shape[0] == 0:
        return torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device), []

    owner = (scores.view(-1, 1, 1) * masks).argmax(0)
    own_masks = masks >= 0.5
    accepted: list[int] = []
    for query in range(masks.shape[0]):
        won = owner == query
        won_area, own_area = won.sum().item(), own_masks[query].sum().item()
        visible_area = (won & own_masks[query]).sum().item()
        if won_area == 0 or own_area == 0 or visible_area == 0:
            continue
        if won_area / own_area < overlap_threshold:
            continue
        accepted.append(query)
    # A pixel is shown only where its winning query's own mask covers it.
    owner = torch.where(own_masks.gather(0, owner[None])[0], owner, -1)
    return _paint_segments(owner, accepted, labels.tolist(), thing_ids)


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    topk: int,
    thing_ids: Optional[set[int]] = None,
    mask_probs: Optional[torch.Tensor] = None,
) -> Instances:
    """The ``topk`` best (query, class) pairs as instances.

    Score = p(class) x mean mask probability inside the predicted mask (logit > 0). With
    ``thing_ids`` (a panoptic model), only thing classes are kept. Boxes are the masks' extents.
    ``mask_probs``: ``mask_pred.sigmoid()``, if the caller has it already.
    """
    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    scores, labels, queries = _topk_query_class_pairs(class_probs, topk, thing_ids)
    probs = mask_pred[queries].sigmoid() if mask_probs is None else mask_probs[queries]
    # Thresholding all logits, then gathering, copies bools instead of float masks.
    return _instances(mask_pred.shape[-2:], scores, labels, probs, mask_pred.gt(0)[queries])


def kmax_semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """kMaX-DeepLab per-class scores [K, H, W] from class logits [Q, K+1] and mask logits [Q, H, W].

    Sum over queries of p(class) x P(query | pixel), P being the softmax over queries. Summed over
    classes this is 1 minus the "no object" mass of the pixel.
    """
    class_probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", class_probs, F.softmax(mask_pred, dim=0))


def kmax_panoptic_inference(
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

    Returns:
        panoptic_seg [H, W] int32 (0 = void) and segments_info
        [{"id", "category_id" (contiguous), "isthing", "score"}], ids 1..n in paste order; "score"
        is the ordering score of the segment's first query.
    """
    class_scores, labels = F.softmax(mask_cls, dim=-1)[:, :-1].max(-1)
    mask_probs = F.softmax(mask_pred, dim=0)
    binary_masks = mask_probs > pixel_confidence_threshold
    areas = binary_masks.flatten(1).sum(1)
    mean_mask_probs = (mask_probs * binary_masks).flatten(1).sum(1) / areas.clamp(min=1)
    reorder_scores = class_scores.pow(reorder_class_weight) * mean_mask_probs.pow(reorder_mask_weight)

    class_thresholds = torch.where(_is_thing(labels, thing_ids), class_threshold_thing, class_threshold_stuff)
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
    return _paint_segments(
        owner, accepted, labels[order].tolist(), thing_ids, scores=reorder_scores[order].tolist()
    )


def kmax_instance_inference(
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
    scores, labels, queries = _topk_query_class_pairs(class_probs, topk, thing_ids)
    mask_probs = F.softmax(mask_pred, dim=0)[queries]
    return _instances(mask_pred.shape[-2:], scores, labels, mask_probs, mask_probs > pixel_confidence_threshold)
