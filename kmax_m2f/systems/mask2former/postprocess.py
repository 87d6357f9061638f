"""Mask2Former's inference: semantic, panoptic and instance results from one image's class
logits [Q, K+1] (the last class is "no object") and mask logits [Q, H, W], each query's mask
read on its own (sigmoid)."""
from typing import Optional

import torch
from detectron2.structures import Instances
from torch.nn import functional as F

from ...modeling.postprocess import mean_inside, paint_segments, scored_instances, topk_query_class_pairs


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """[K, H, W] per-class scores: sum over queries of p(class) x sigmoid(mask)."""
    class_probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", class_probs, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: set[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> tuple[torch.Tensor, list[dict]]:
    """Non-overlapping segments from the confident queries.

    Queries whose top class is not "no object" and whose score exceeds ``object_mask_threshold``
    compete for pixels by score x mask probability. A query keeps its pixels only if they are at
    least ``overlap_threshold`` of its own mask (mask >= 0.5); stuff queries of one class merge.

    Args:
        thing_ids: contiguous ids of the thing classes.

    Returns:
        panoptic_seg [H, W] int32 (0 = void) and segments_info
        [{"id", "category_id" (contiguous), "isthing"}], as COCOPanopticEvaluator reads them.
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    masks = mask_pred[keep].sigmoid()
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
    return paint_segments(owner, accepted, labels.tolist(), thing_ids)


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    topk: int,
    thing_ids: Optional[set[int]] = None,
) -> Instances:
    """The ``topk`` best (query, class) pairs as instances.

    Score = p(class) x mean mask probability inside the predicted mask (logit > 0). With
    ``thing_ids`` (a panoptic model), only thing classes are kept. Boxes are the masks' extents.
    """
    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    scores, labels, queries = topk_query_class_pairs(class_probs, topk, thing_ids)
    # The mask score of each paired query once (a query can be paired with several classes), one
    # query at a time: the [N, H, W] probabilities of all pairs would be the largest tensor.
    inside = mask_pred.gt(0)
    query_scores = mask_pred.new_zeros(len(mask_pred))
    for query in queries.unique().tolist():
        query_scores[query] = mean_inside(mask_pred[query : query + 1].sigmoid(), inside[query : query + 1])[0]
    return scored_instances(mask_pred.shape[-2:], scores, labels, query_scores[queries], inside[queries])
