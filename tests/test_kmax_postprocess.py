"""kMaX-DeepLab post-processing: panoptic merging, semantic scores and instances."""
import math

import pytest
import torch
from detectron2.structures import BitMasks
from torch.nn import functional as F

from kmax_m2f.modeling.postprocess import boxes_from_masks
from kmax_m2f.systems.kmax_deeplab.postprocess import instance_inference as kmax_instance_inference
from kmax_m2f.systems.kmax_deeplab.postprocess import panoptic_inference as kmax_panoptic_inference
from kmax_m2f.systems.kmax_deeplab.postprocess import semantic_inference as kmax_semantic_inference

COCO_THRESHOLDS = dict(pixel_confidence_threshold=0.4, class_threshold_thing=0.7, class_threshold_stuff=0.5,
                       overlap_threshold=0.8)


def _log(probs) -> torch.Tensor:
    """Logits whose softmax (over the last dim) is ``probs``."""
    return torch.tensor(probs, dtype=torch.float32).log()


def _mask_logits(pixel_probs) -> torch.Tensor:
    """[Q, H, W] mask logits from per-pixel query distributions given as [H, W, Q] nested lists."""
    return _log(pixel_probs).permute(2, 0, 1).contiguous()


def _reference_panoptic(mask_cls, mask_pred, thing_ids, *, pixel_confidence_threshold, class_threshold_thing,
                        class_threshold_stuff, overlap_threshold, reorder_class_weight=1.0,
                        reorder_mask_weight=1.0):
    """The greedy merging written as a plain per-query, per-pixel loop."""
    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    mask_probs = F.softmax(mask_pred, dim=0)
    num_queries, height, width = mask_probs.shape
    proposals = []
    for query in range(num_queries):
        prob, label = class_probs[query].max(0)
        mask = mask_probs[query] > pixel_confidence_threshold
        area = int(mask.sum())
        mean = float(mask_probs[query][mask].sum()) / max(area, 1)
        score = float(prob) ** reorder_class_weight * mean ** reorder_mask_weight
        proposals.append((score, query, float(prob), int(label), mask.tolist(), area))
    proposals.sort(key=lambda p: -p[0])  # stable: ties keep query order

    panoptic = [[0] * width for _ in range(height)]
    segments, stuff_ids = [], {}
    for score, _, prob, label, mask, area in proposals:
        isthing = label in thing_ids
        if prob <= (class_threshold_thing if isthing else class_threshold_stuff):
            continue
        free = [(y, x) for y in range(height) for x in range(width) if mask[y][x] and panoptic[y][x] == 0]
        if not len(free) > area * overlap_threshold:
            continue
        if not isthing and label in stuff_ids:
            segment_id = stuff_ids[label]
        else:
            segment_id = len(segments) + 1
            segments.append({"id": segment_id, "isthing": isthing, "category_id": label})
            if not isthing:
                stuff_ids[label] = segment_id
        for y, x in free:
            panoptic[y][x] = segment_id
    return torch.tensor(panoptic, dtype=torch.int32), segments


def _check_invariants(panoptic, segments, mask_cls, mask_pred, thing_ids, pixel_confidence_threshold):
    ids = [s["id"] for s in segments]
    assert ids == list(range(1, len(segments) + 1))
    assert set(panoptic.unique().tolist()) - {0} == set(ids), "listed ids are exactly the painted ones"
    stuff_classes = [s["category_id"] for s in segments if not s["isthing"]]
    assert len(stuff_classes) == len(set(stuff_classes)), "one segment per stuff class"
    assert all(s["isthing"] == (s["category_id"] in thing_ids) for s in segments)
    # Every painted pixel is confident for some query of the segment's class.
    class_labels = F.softmax(mask_cls, dim=-1)[:, :-1].argmax(-1)
    confident = F.softmax(mask_pred, dim=0) > pixel_confidence_threshold
    for s in segments:
        of_class = confident[class_labels == s["category_id"]].any(0)
        assert of_class[panoptic == s["id"]].all()


def _strip_scores(segments):
    return [{k: v for k, v in s.items() if k != "score"} for s in segments]


@pytest.mark.parametrize("pixel_threshold,overlap", [(0.4, 0.8), (0.2, 0.5), (0.2, 0.0), (0.5, 0.9)])
def test_panoptic_matches_reference_loop_on_random_inputs(pixel_threshold, overlap):
    generator = torch.Generator().manual_seed(0)
    for trial in range(25):
        num_queries, num_classes = 12, 5
        mask_cls = torch.randn(num_queries, num_classes + 1, generator=generator) * 4
        mask_pred = torch.randn(num_queries, 7, 9, generator=generator) * 3
        thing_ids = {0, 2} if trial % 2 else {1, 3, 4}
        kwargs = dict(pixel_confidence_threshold=pixel_threshold, class_threshold_thing=0.6,
                      class_threshold_stuff=0.4, overlap_threshold=overlap,
                      reorder_class_weight=1.0 + trial % 3, reorder_mask_weight=1.0)
        panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, thing_ids, **kwargs)
        expected_panoptic, expected_segments = _reference_panoptic(mask_cls, mask_pred, thing_ids, **kwargs)
        assert panoptic.dtype == torch.int32 and panoptic.shape == (7, 9)
        assert torch.equal(panoptic, expected_panoptic), trial
        assert _strip_scores(segments) == expected_segments, trial
        _check_invariants(panoptic, segments, mask_cls, mask_pred, thing_ids, pixel_threshold)
        # In place: the same result, the logits' memory reused for the probabilities.
        logits = mask_pred.clone()
        in_place, in_place_segments = kmax_panoptic_inference(mask_cls, logits, thing_ids, inplace=True, **kwargs)
        assert torch.equal(in_place, panoptic) and in_place_segments == segments, trial
        assert not torch.equal(logits, mask_pred)


def test_panoptic_tiny_example_by_hand():
    # 3 queries, 2 classes (0 thing, 1 stuff) + "no object"; 4x4 pixels in 2x2 quadrants.
    mask_cls = _log([[0.8, 0.1, 0.1], [0.1, 0.6, 0.3], [0.65, 0.05, 0.3]])
    quadrants = {"tl": [0.9, 0.05, 0.05], "tr": [0.05, 0.9, 0.05], "bl": [0.1, 0.1, 0.8], "br": [0.45, 0.45, 0.1]}
    layout = [["tl", "tl", "tr", "tr"]] * 2 + [["bl", "bl", "br", "br"]] * 2
    mask_pred = _mask_logits([[quadrants[q] for q in row] for row in layout])
    # Query 0: thing p=0.8, mask tl+br (8 px, mean 0.675) -> score 0.54, pasted first.
    # Query 2: thing p=0.65 < 0.7, score 0.52 -> dropped; its quadrant bl stays void.
    # Query 1: stuff p=0.6, mask tr+br, score 0.405; only tr (4 of 8 px) is still free.
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **COCO_THRESHOLDS)
    assert panoptic.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert _strip_scores(segments) == [{"id": 1, "isthing": True, "category_id": 0}]
    assert segments[0]["score"] == pytest.approx(0.8 * 0.675, abs=1e-5)

    overlap_half = dict(COCO_THRESHOLDS, overlap_threshold=0.5)
    panoptic, _ = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **overlap_half)
    assert (panoptic[:2, 2:] == 0).all(), "4 free pixels are not more than half of 8"

    overlap_low = dict(COCO_THRESHOLDS, overlap_threshold=0.4)
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **overlap_low)
    assert panoptic.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert _strip_scores(segments)[1] == {"id": 2, "isthing": False, "category_id": 1}
    assert segments[1]["score"] == pytest.approx(0.6 * 0.675, abs=1e-5)

    # The class threshold is strict: a probability equal to it is not confident.
    exact = float(F.softmax(mask_cls, dim=-1)[1, 1])
    _, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **dict(overlap_low, class_threshold_stuff=exact))
    assert [s["category_id"] for s in segments] == [0]


def test_panoptic_merges_stuff_and_separates_things():
    # 1x8: pixels 0-1 query 0, 2-3 query 1, 4-5 query 2, 6-7 query 3, each with probability ~1.
    owners = [0, 0, 1, 1, 2, 2, 3, 3]
    mask_pred = torch.full((4, 1, 8), -20.0)
    mask_pred[owners, 0, torch.arange(8)] = 20.0
    mask_cls = torch.full((4, 4), -20.0)
    mask_cls[[0, 1, 2, 3], [2, 2, 0, 0]] = 20.0  # stuff 2, stuff 2, thing 0, thing 0
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **COCO_THRESHOLDS)
    assert _strip_scores(segments) == [
        {"id": 1, "isthing": False, "category_id": 2},
        {"id": 2, "isthing": True, "category_id": 0},
        {"id": 3, "isthing": True, "category_id": 0},
    ]
    assert panoptic[0].tolist() == [1, 1, 1, 1, 2, 2, 3, 3]


def test_panoptic_class_thresholds_differ_for_things_and_stuff():
    mask_cls = _log([[0.6, 0.2, 0.2]])  # p=0.6: above the stuff threshold 0.5, below the thing 0.7
    mask_pred = torch.zeros(1, 3, 3)
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, set(), **COCO_THRESHOLDS)
    assert [s["isthing"] for s in segments] == [False] and (panoptic == 1).all()
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **COCO_THRESHOLDS)
    assert segments == [] and (panoptic == 0).all()


def test_panoptic_overlap_threshold_drops_covered_masks_and_leaves_their_pixels_void():
    # 1x10. Query 0 (p=0.9): pixels 0-5. Query 1 (p=0.8): pixels 2-6, sharing 2-5 with query 0.
    probs = [[1, 0, 0]] * 2 + [[0.5, 0.5, 0]] * 4 + [[0, 1, 0]] + [[0, 0, 1]] * 3
    mask_pred = _mask_logits([[[max(p, 1e-6) for p in pixel] for pixel in probs]])
    mask_cls = _log([[0.9, 0.05, 0.05], [0.05, 0.8, 0.15], [0.01, 0.01, 0.98]])  # query 2: "no object"
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0, 1}, **COCO_THRESHOLDS)
    assert [s["category_id"] for s in segments] == [0]
    assert panoptic[0].tolist() == [1] * 6 + [0] * 4, "query 1 has 1 of 5 pixels free: dropped, pixel 6 void"
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0, 1},
                                                 **dict(COCO_THRESHOLDS, overlap_threshold=0.1))
    assert [s["category_id"] for s in segments] == [0, 1]
    assert panoptic[0].tolist() == [1] * 6 + [2] + [0] * 3, "pasted on its free pixel only"


def test_panoptic_dropped_mask_leaves_its_pixels_free_for_later_masks():
    # 1x8, visited by class probability. Query 0: pixels 0-3. Query 1: pixels 0-4, dropped (1 of 5
    # free). Query 2: pixels 4-7; it needs pixel 4 (shared with query 1) to have 4 > 0.8 x 4 free.
    probs = [[0.5, 0.5, 0]] * 4 + [[0, 0.5, 0.5]] + [[0, 0, 1]] * 3
    mask_pred = _mask_logits([[[max(p, 1e-6) for p in pixel] for pixel in probs]])
    mask_cls = _log([[0.95, 0.03, 0.02], [0.03, 0.9, 0.07], [0.75, 0.05, 0.2]])
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0, 1}, **COCO_THRESHOLDS,
                                                 reorder_mask_weight=0.0)
    assert [s["category_id"] for s in segments] == [0, 0]
    assert panoptic[0].tolist() == [1] * 4 + [2] * 4


def test_panoptic_repeated_stuff_class_still_needs_free_pixels():
    # Queries 0 and 1 are both stuff class 1; query 1 is mostly covered by query 0.
    probs = [[1, 0]] * 4 + [[0.5, 0.5]] * 3 + [[0, 1]]
    mask_pred = _mask_logits([[[max(p, 1e-6) for p in pixel] for pixel in probs]])
    mask_cls = _log([[0.05, 0.9, 0.05], [0.05, 0.8, 0.15]])
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **COCO_THRESHOLDS)
    assert len(segments) == 1 and panoptic[0].tolist() == [1] * 7 + [0]
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **dict(COCO_THRESHOLDS, overlap_threshold=0.2))
    assert len(segments) == 1 and panoptic[0].tolist() == [1] * 8, "merged into the class's segment"


def test_panoptic_pixel_confidence_threshold():
    # 1x6: pixels 0-1 split evenly over 3 queries (P = 1/3); pixels 2-5 belong to query 0.
    mask_pred = torch.full((3, 1, 6), -20.0)
    mask_pred[:, 0, :2] = 0.0
    mask_pred[0, 0, 2:] = 20.0
    mask_cls = _log([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    panoptic, _ = kmax_panoptic_inference(mask_cls, mask_pred, set(), **COCO_THRESHOLDS)
    assert panoptic[0].tolist() == [0, 0, 1, 1, 1, 1], "P = 1/3 is below 0.4"
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, set(),
                                                 **dict(COCO_THRESHOLDS, pixel_confidence_threshold=0.3))
    assert panoptic[0].tolist() == [1] * 6 and len(segments) == 1


def test_panoptic_order_follows_reorder_score():
    # 1x8. Query 0 (p=0.9): pixels 0-3 at P=0.5 (mean 0.5). Query 1 (p=0.75): pixels 0-3 at 0.5 and
    # 4-7 at ~1 (mean 0.75). Class-only ordering visits query 0 first, the product visits query 1.
    probs = [[0.5, 0.5]] * 4 + [[1e-6, 1.0]] * 4
    mask_pred = _mask_logits([probs])
    mask_cls = _log([[0.9, 0.05, 0.05], [0.05, 0.75, 0.2]])
    _, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0, 1}, **COCO_THRESHOLDS)
    assert [s["category_id"] for s in segments] == [1], "0.75 x 0.75 > 0.9 x 0.5"
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0, 1}, **COCO_THRESHOLDS,
                                                 reorder_mask_weight=0.0)
    assert [s["category_id"] for s in segments] == [0] and panoptic[0].tolist() == [1] * 4 + [0] * 4
    _, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0, 1}, **COCO_THRESHOLDS,
                                          reorder_class_weight=4.0)
    assert [s["category_id"] for s in segments] == [0], "0.9^4 x 0.5 > 0.75^4 x 0.75"


def test_panoptic_all_void_when_nothing_is_confident():
    generator = torch.Generator().manual_seed(1)
    mask_cls = torch.randn(6, 4, generator=generator) * 0.1  # class probabilities ~ 1/4
    mask_pred = torch.randn(6, 5, 5, generator=generator)
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **COCO_THRESHOLDS)
    assert segments == [] and panoptic.shape == (5, 5) and (panoptic == 0).all()
    panoptic, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **dict(
        COCO_THRESHOLDS, class_threshold_thing=0.0, class_threshold_stuff=0.0, pixel_confidence_threshold=1.0))
    assert segments == [] and (panoptic == 0).all(), "no pixel has P > 1"


def test_semantic_matches_loop_and_sums_to_non_void_mass():
    generator = torch.Generator().manual_seed(2)
    mask_cls = torch.randn(5, 4, generator=generator)
    mask_pred = torch.randn(5, 3, 6, generator=generator) * 2
    semantic = kmax_semantic_inference(mask_cls, mask_pred)
    class_probs = F.softmax(mask_cls, dim=-1)
    mask_probs = F.softmax(mask_pred, dim=0)
    expected = torch.zeros(3, 3, 6)
    for query in range(5):
        for label in range(3):
            expected[label] += class_probs[query, label] * mask_probs[query]
    assert semantic.shape == (3, 3, 6)
    assert torch.allclose(semantic, expected, atol=1e-6)
    void_mass = torch.einsum("q,qhw->hw", class_probs[:, -1], mask_probs)
    assert torch.allclose(semantic.sum(0), 1 - void_mass, atol=1e-6)


def _random_instance_inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=generator) * 2, torch.randn(6, 8, 7, generator=generator) * 3


def test_instance_topk_scores_and_masks_follow_the_formula():
    mask_cls, mask_pred = _random_instance_inputs(3)
    result = kmax_instance_inference(mask_cls, mask_pred, topk=7, pixel_confidence_threshold=0.4)
    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    mask_probs = F.softmax(mask_pred, dim=0)
    pairs = sorted(((float(class_probs[q, c]), q, c) for q in range(6) for c in range(4)), reverse=True)[:7]
    expected = []
    for prob, query, label in pairs:
        mask = mask_probs[query] > 0.4
        mean = float(mask_probs[query][mask].sum()) / int(mask.sum()) if mask.any() else 0.0
        expected.append((prob * mean, label, mask))
    assert len(result) == 7 and result.image_size == (8, 7)
    got = sorted(zip(result.scores.tolist(), result.pred_classes.tolist(), result.pred_masks.bool()),
                 key=lambda x: -x[0])
    for (score, label, mask), (want_score, want_label, want_mask) in zip(got, sorted(expected, key=lambda x: -x[0])):
        assert score == pytest.approx(want_score, rel=1e-4, abs=1e-6)
        assert label == want_label and torch.equal(mask, want_mask)
    assert len(kmax_instance_inference(mask_cls, mask_pred, topk=100, pixel_confidence_threshold=0.4)) == 24


def test_instance_thing_filter_keeps_only_things_of_the_topk():
    mask_cls, mask_pred = _random_instance_inputs(4)
    everything = kmax_instance_inference(mask_cls, mask_pred, topk=10, pixel_confidence_threshold=0.4)
    things = kmax_instance_inference(mask_cls, mask_pred, topk=10, pixel_confidence_threshold=0.4, thing_ids={1, 3})
    assert set(things.pred_classes.tolist()) <= {1, 3}
    is_thing = (everything.pred_classes == 1) | (everything.pred_classes == 3)
    assert sorted(things.scores.tolist()) == sorted(everything.scores[is_thing].tolist())
    assert len(kmax_instance_inference(mask_cls, mask_pred, 10, 0.4, thing_ids=set())) == 0


def test_instance_boxes_enclose_masks_tightly():
    mask_cls, mask_pred = _random_instance_inputs(5)
    mask_pred[0] = -20.0  # query 0 never wins a pixel: empty masks, zero boxes
    result = kmax_instance_inference(mask_cls, mask_pred, topk=24, pixel_confidence_threshold=0.3)
    masks = result.pred_masks.bool()
    assert masks.any((1, 2)).any() and not masks.any((1, 2)).all(), "inputs cover both cases"
    for mask, box in zip(masks, result.pred_boxes.tensor.tolist()):
        if not mask.any():
            assert box == [0.0, 0.0, 0.0, 0.0]
            continue
        ys, xs = mask.nonzero(as_tuple=True)
        assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_boxes_from_masks_equal_detectron2_bitmasks():
    generator = torch.Generator().manual_seed(6)
    masks = torch.rand(20, 9, 11, generator=generator) > 0.97
    masks[0] = False
    assert torch.equal(boxes_from_masks(masks).tensor, BitMasks(masks).get_bounding_boxes().tensor)
    assert boxes_from_masks(torch.zeros(0, 4, 4, dtype=torch.bool)).tensor.shape == (0, 4)


def test_panoptic_score_is_the_reorder_score():
    mask_cls = _log([[0.8, 0.2]])
    mask_pred = torch.zeros(1, 2, 2)
    _, segments = kmax_panoptic_inference(mask_cls, mask_pred, {0}, **COCO_THRESHOLDS, reorder_class_weight=2.0)
    assert segments[0]["score"] == pytest.approx(0.8 ** 2, rel=1e-5)
    assert math.isfinite(segments[0]["score"])
