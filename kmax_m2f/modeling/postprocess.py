"""The parts of panoptic and instance post-processing that every mask-classification system
shares: numbering and painting segments, boxes from masks, top-k (query, class) pairs, scored
instances. Each system's own rules (how masks compete for pixels) live in its folder.
Inputs are one image's predictions: class logits / probabilities [Q, K(+1)], masks [Q, H, W].
"""
from typing import Optional

import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, Instances


def is_thing(labels: torch.Tensor, thing_ids: set[int]) -> torch.Tensor:
    """Bool tensor shaped like ``labels``: which contiguous class ids are thing classes."""
    return torch.isin(labels, torch.tensor(sorted(thing_ids), dtype=labels.dtype, device=labels.device))


def paint_segments(
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


def resize_to_output(result: torch.Tensor, image_size: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """detectron2's ``sem_seg_postprocess``: [C, H_pad, W_pad] -> [C, height, width] (crop the
    padding of an ``image_size`` image, resize). When the output has the image's own size the
    resize is the identity, and the crop is returned as a view of ``result``: the resize would
    still cost a full-resolution copy (100 masks at 800x1333: 430 MB and 170 ms on 2 CPU cores).
    """
    if (int(height), int(width)) == (int(image_size[0]), int(image_size[1])):
        return result[:, : int(height), : int(width)]
    return sem_seg_postprocess(result, image_size, height, width)


def boxes_from_masks(masks: torch.Tensor) -> Boxes:
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


def topk_query_class_pairs(
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
        keep = is_thing(labels, thing_ids)
        scores, labels, queries = scores[keep], labels[keep], queries[keep]
    return scores, labels, queries


def mean_inside(mask_probs: torch.Tensor, binary_masks: torch.Tensor) -> torch.Tensor:
    """[N] mean of each [H, W] probability map of ``mask_probs`` [N, H, W] inside the matching
    bool mask of ``binary_masks`` [N, H, W] (0 for an empty mask). One map at a time: at full
    image resolution an [N, H, W] product would be the largest tensor of inference."""
    if len(mask_probs) == 0:
        return mask_probs.new_zeros(0)
    return torch.stack([(probs * mask).sum() / (mask.sum() + 1e-6) for probs, mask in zip(mask_probs, binary_masks)])


def scored_instances(
    image_size: tuple[int, int],
    class_scores: torch.Tensor,
    labels: torch.Tensor,
    mask_scores: torch.Tensor,
    binary_masks: torch.Tensor,
) -> Instances:
    """Instances scored by class probability x mask score.

    Args:
        class_scores, labels, mask_scores: [N] (mask scores: e.g. :func:`mean_inside`).
        binary_masks: [N, H, W] bool.
    """
    result = Instances(image_size)
    result.pred_masks = binary_masks.float()
    result.pred_boxes = boxes_from_masks(binary_masks)
    result.scores = class_scores * mask_scores
    result.pred_classes = labels
    return result
