"""Turning per-query class and mask predictions into semantic, panoptic and instance results.

Shared by the mask-classification meta-architectures. Inputs are one image's predictions:
class logits [Q, K+1] (the last class is "no object") and mask logits [Q, H, W].
"""
from typing import Optional

import torch
from detectron2.structures import BitMasks, Instances
from torch.nn import functional as F


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
    scores, labels, masks = scores[keep], labels[keep], mask_pred[keep].sigmoid()

    height, width = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device)
    segments_info: list[dict] = []
    if masks.shape[0] == 0:
        return panoptic_seg, segments_info

    owner = (scores.view(-1, 1, 1) * masks).argmax(0)
    stuff_segment_of_class: dict[int, int] = {}
    for query, label in enumerate(labels.tolist()):
        own_mask = masks[query] >= 0.5
        won = owner == query
        visible = won & own_mask
        won_area, own_area, visible_area = won.sum().item(), own_mask.sum().item(), visible.sum().item()
        if won_area == 0 or own_area == 0 or visible_area == 0:
            continue
        if won_area / own_area < overlap_threshold:
            continue
        isthing = label in thing_ids
        if not isthing and label in stuff_segment_of_class:
            panoptic_seg[visible] = stuff_segment_of_class[label]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment_of_class[label] = segment_id
        panoptic_seg[visible] = segment_id
        segments_info.append({"id": segment_id, "isthing": bool(isthing), "category_id": int(label)})
    return panoptic_seg, segments_info


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
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(num_queries)
    scores, flat_indices = class_probs.flatten().topk(min(topk, class_probs.numel()), sorted=False)
    labels = labels[flat_indices]
    masks = mask_pred[torch.div(flat_indices, num_classes, rounding_mode="floor")]
    if thing_ids is not None:
        keep = torch.tensor([label in thing_ids for label in labels.tolist()], dtype=torch.bool, device=labels.device)
        scores, labels, masks = scores[keep], labels[keep], masks[keep]

    result = Instances(mask_pred.shape[-2:])
    binary = masks > 0
    result.pred_masks = binary.float()
    result.pred_boxes = BitMasks(binary).get_bounding_boxes().to(mask_pred.device)
    mask_scores = (masks.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    result.scores = scores * mask_scores
    result.pred_classes = labels
    return result
