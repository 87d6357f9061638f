"""kMaX-DeepLab's matching cost and losses against explicit per-pixel / per-query formulas (plain
Python loops), brute-force matching, the pixel sampler's distribution, and kMaXSetCriterion's
bookkeeping (shared matching, auxiliary outputs, weights, gradients, empty images, bad inputs)."""

import itertools
import math

import pytest
import torch

from kmax_m2f.modeling.set_criterion import build_weight_dict
from kmax_m2f.systems.kmax_deeplab import criterion as kmax_module
from kmax_m2f.systems.kmax_deeplab.criterion import (
    kMaXMatchingCost,
    kMaXSetCriterion,
    kmax_class_similarity,
    kmax_mask_similarity,
)
from kmax_m2f.modeling.matcher import HungarianMatcher

from .conftest import default_dtype

K = 3  # classes without void
IGNORE = 255
WEIGHTS = {"loss_ce": 3.0, "loss_dice": 3.0, "loss_mask": 0.3, "loss_pixel_insdis": 1.0, "loss_aux_semantic": 1.0}


# ---------------------------------------------------------------------------------------------
# Cases and plain-Python references
# ---------------------------------------------------------------------------------------------


def target_from_map(segments: torch.Tensor, labels: list[int]) -> dict[str, torch.Tensor]:
    """Target dict of an [H, W] map of segment ids (-1 = void) whose segment m has class labels[m]."""
    masks = (
        torch.stack([segments == m for m in range(len(labels))]).float() if labels else torch.zeros(0, *segments.shape)
    )
    semantic = torch.full(segments.shape, IGNORE, dtype=torch.int64)
    for m, label in enumerate(labels):
        semantic[segments == m] = label
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": masks, "semantic_masks": semantic}


def random_case(
    seed: int, num_queries: int, num_segments: list[int], size=(3, 4), dim: int = 4, semantic_channels=K + 1
):
    """Outputs and targets for len(num_segments) images; every segment is non-empty and about a
    fifth of the pixels are void."""
    g = torch.Generator().manual_seed(seed)
    batch, (h, w) = len(num_segments), size
    targets = []
    for m in num_segments:
        segments = torch.randint(0, max(m, 1), (h, w), generator=g)
        segments[torch.rand(h, w, generator=g) < 0.2] = -1
        segments.view(-1)[torch.randperm(h * w, generator=g)[:m]] = torch.arange(m)  # each segment present
        if m == 0:
            segments.fill_(-1)
        targets.append(target_from_map(segments, torch.randint(0, K, (m,), generator=g).tolist()))
    features = torch.nn.functional.normalize(torch.randn(batch, dim, h, w, generator=g), dim=1)
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, K + 1, generator=g),
        "pred_masks": 2 * torch.randn(batch, num_queries, h, w, generator=g),
        "pixel_feature": features,
        "aux_semantic_pred": torch.randn(batch, semantic_channels, h, w, generator=g),
    }
    return outputs, targets


def image(outputs: dict, b: int) -> dict:
    return {k: v[b] for k, v in outputs.items() if isinstance(v, torch.Tensor)}


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def query_softmax(mask_logits: torch.Tensor) -> list[list[float]]:
    """[N, H, W] logits -> p[q][pixel], softmax over the queries at each pixel."""
    columns = [softmax(col) for col in mask_logits.flatten(1).T.tolist()]
    return [[col[q] for col in columns] for q in range(mask_logits.shape[0])]


def reference_dice_similarity(p: list[float], t: list[float], labelled: list[bool], masking: bool) -> float:
    if masking:
        p = [pi * li for pi, li in zip(p, labelled)]
    return sum(pi * ti for pi, ti in zip(p, t)) / ((sum(p) + sum(t)) / 2 + 1e-5)


def reference_cost(outputs_b: dict, target: dict, masking: bool = True) -> list[list[float]]:
    p = query_softmax(outputs_b["pred_masks"])
    t = target["masks"].flatten(1).tolist()
    labelled = [any(col) for col in zip(*t)]
    class_probs = [softmax(row) for row in outputs_b["pred_logits"].tolist()]
    return [
        [
            -reference_dice_similarity(p[q], t[n], labelled, masking) * class_probs[q][label]
            for n, label in enumerate(target["labels"].tolist())
        ]
        for q in range(len(p))
    ]


def brute_force_total(cost: list[list[float]]) -> float:
    num_queries, num_targets = len(cost), len(cost[0])
    if num_queries >= num_targets:
        return min(
            sum(cost[q][n] for n, q in enumerate(qs)) for qs in itertools.permutations(range(num_queries), num_targets)
        )
    return min(
        sum(cost[q][n] for q, n in enumerate(ns)) for ns in itertools.permutations(range(num_targets), num_queries)
    )


class FixedMatcher:
    """Returns the given (pred, target) pairs for every image and counts its calls."""

    def __init__(self, pairs: list[list[tuple[int, int]]]):
        self.pairs = pairs
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        return [
            (torch.tensor([q for q, _ in p], dtype=torch.int64), torch.tensor([n for _, n in p], dtype=torch.int64))
            for p in self.pairs
        ]


class CountingMatcher:
    def __init__(self, matcher):
        self.matcher = matcher
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        return self.matcher(outputs, targets)


def criterion(matcher, losses=("labels", "masks", "pixels", "aux_semantic"), num_aux: int = 0, **kwargs):
    """A kMaXSetCriterion with the default weights for the final output and num_aux auxiliary ones."""
    return kMaXSetCriterion(K, matcher, weight_dict=build_weight_dict(WEIGHTS, num_aux), losses=list(losses), **kwargs)


# Pairs of the hand-computed cases: image 0 has 2 segments and 4 queries, image 1 one segment.
HAND_PAIRS = [[(2, 0), (0, 1)], [(3, 0)]]


def hand_case(semantic_channels=K + 1):
    return random_case(11, num_queries=4, num_segments=[2, 1], size=(3, 4), semantic_channels=semantic_channels)


def matched_query_of(pairs: list[tuple[int, int]]) -> dict[int, int]:
    return {n: q for q, n in pairs}


def reference_class_loss(outputs, targets, pairs, masking=True, eos=1e-5) -> float:
    per_image = []
    for b, target in enumerate(targets):
        p = query_softmax(outputs["pred_masks"][b])
        t = target["masks"].flatten(1).tolist()
        labelled = [any(col) for col in zip(*t)]  # all segments are matched in these cases
        query_to_target = {q: n for q, n in pairs[b]}
        terms = []
        for q, logits in enumerate(outputs["pred_logits"][b].tolist()):
            probs = softmax(logits)
            if q in query_to_target:
                n = query_to_target[q]
                weight = reference_dice_similarity(p[q], t[n], labelled, masking)
                cls, alpha = target["labels"][n].item(), 0.75
            else:
                weight = sum(pq for pq, lab in zip(p[q], labelled) if not lab) / (sum(p[q]) + 1e-5)
                cls, alpha = K, 0.25
            terms.append(alpha * max(weight, eos) * -math.log(probs[cls]))
        per_image.append(sum(terms) / max(1, sum(x != 0 for x in terms)))
    return sum(per_image) / len(per_image)


def reference_dice_loss(outputs, targets, pairs, masking=True, eos=1e-5) -> float:
    per_image = []
    num_queries = outputs["pred_masks"].shape[1]
    for b, target in enumerate(targets):
        p = query_softmax(outputs["pred_masks"][b])
        t = target["masks"].flatten(1).tolist()
        labelled = [any(col) for col in zip(*t)]
        total = 0.0
        for q, n in pairs[b]:
            class_prob = max(softmax(outputs["pred_logits"][b, q].tolist())[target["labels"][n].item()], eos)
            pq = [x * lab for x, lab in zip(p[q], labelled)] if masking else p[q]
            dice = (2 * sum(a * c for a, c in zip(pq, t[n])) + 1) / (sum(pq) + sum(t[n]) + 1)
            total += class_prob * (1 - dice)
        per_image.append(0.75 * total / num_queries)
    return sum(per_image) / len(per_image)


def reference_mask_id_ce(outputs, targets, pairs) -> float:
    per_image = []
    for b, target in enumerate(targets):
        p = query_softmax(outputs["pred_masks"][b])
        t = target["masks"].flatten(1).tolist()
        query_of = matched_query_of(pairs[b])
        terms = [-math.log(p[query_of[n]][pixel]) for n, row in enumerate(t) for pixel, v in enumerate(row) if v]
        per_image.append(sum(terms) / max(1, len(terms)))
    return sum(per_image) / len(per_image)


def reference_insdis(features: torch.Tensor, segment_of: list[int], sampled: list[int], temperature=0.3) -> float:
    """Mean over the sampled labelled pixels i of -mean_{j sampled, same segment} log softmax_j(<f_i, f_j> / T),
    the softmax running over all sampled pixels j (void ones included)."""
    f = features.flatten(1).T.tolist()  # [L][D]
    terms = []
    for i in sampled:
        if segment_of[i] < 0:
            continue
        logits = [sum(a * c for a, c in zip(f[i], f[j])) / temperature for j in sampled]
        log_norm = math.log(sum(math.exp(x) for x in logits))
        positives = [x for x, j in zip(logits, sampled) if segment_of[j] == segment_of[i]]
        terms.append(-sum(x - log_norm for x in positives) / len(positives))
    return sum(terms) / max(1, len(terms))


def segment_ids(target: dict) -> list[int]:
    """Flat segment id of each pixel, -1 for void."""
    ids = [-1] * target["semantic_masks"].numel()
    for n, row in enumerate(target["masks"].flatten(1).tolist()):
        for pixel, v in enumerate(row):
            if v:
                ids[pixel] = n
    return ids


def reference_semantic_ce(logits: torch.Tensor, semantic: torch.Tensor, pixels: list[int]) -> float:
    """Mean CE over the given flat pixels whose label is not ignored; logits [C, H, W]."""
    columns, labels = logits.flatten(1).T.tolist(), semantic.flatten().tolist()
    terms = [-math.log(softmax(columns[p])[labels[p]]) for p in pixels if labels[p] != IGNORE]
    return sum(terms) / max(1, len(terms))


# ---------------------------------------------------------------------------------------------
# Matching cost and matcher
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masking", [True, False])
def test_matching_cost_matches_definition(masking):
    outputs, targets = random_case(0, num_queries=4, num_segments=[3])
    cost = kMaXMatchingCost(masking_void_pixel=masking)(image(outputs, 0), targets[0])
    assert cost.shape == (4, 3) and cost.dtype == torch.float32
    expected = torch.tensor(reference_cost(image(outputs, 0), targets[0], masking))
    torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-7)
    # The two factors are exported on their own too.
    similarity = kmax_mask_similarity(outputs["pred_masks"][0], targets[0]["masks"], masking)
    probs = kmax_class_similarity(outputs["pred_logits"][0], targets[0]["labels"])
    torch.testing.assert_close(-similarity * probs, cost)


@pytest.mark.parametrize("num_queries,num_segments", [(5, [4, 2]), (4, [4, 1]), (3, [4]), (2, [2, 1]), (5, [1])])
def test_matcher_with_kmax_cost_vs_brute_force(num_queries, num_segments):
    outputs, targets = random_case(num_queries * 10 + len(num_segments), num_queries, num_segments)
    indices = HungarianMatcher(cost_fn=kMaXMatchingCost())(outputs, targets)
    for b, (target, (pred, tgt)) in enumerate(zip(targets, indices)):
        cost = reference_cost(image(outputs, b), target)
        assert len(pred) == min(num_queries, len(target["labels"]))
        assert len(set(pred.tolist())) == len(pred) and len(set(tgt.tolist())) == len(tgt)
        total = sum(cost[q][n] for q, n in zip(pred.tolist(), tgt.tolist()))
        assert total == pytest.approx(brute_force_total(cost), abs=1e-6)


def test_masking_void_pixels_changes_cost_and_matching():
    """One target on pixel 0 of a 1 x 3 image, pixels 1 and 2 void. Query 0 takes 0.6 of pixel 0
    and all of the void pixels, query 1 takes 0.4 of pixel 0. With masking, query 0's void mass is
    ignored (dice 0.6 / 0.8 = 0.75 > 0.4 / 0.7); without, it counts (0.6 / 1.8 < 0.4 / 0.7)."""
    pred_masks = torch.tensor([[[math.log(0.6), 20.0, 20.0]], [[math.log(0.4), -20.0, -20.0]]])[None]
    outputs = {"pred_masks": pred_masks, "pred_logits": torch.zeros(1, 2, K + 1)}
    targets = [{"labels": torch.tensor([1]), "masks": torch.tensor([[[1.0, 0.0, 0.0]]])}]
    p_class = 1 / (K + 1)

    masked = kMaXMatchingCost(True)(image(outputs, 0), targets[0])
    unmasked = kMaXMatchingCost(False)(image(outputs, 0), targets[0])
    assert masked[:, 0].tolist() == pytest.approx([-0.6 / 0.8 * p_class, -0.4 / 0.7 * p_class], rel=1e-4)
    assert unmasked[:, 0].tolist() == pytest.approx([-0.6 / 1.8 * p_class, -0.4 / 0.7 * p_class], rel=1e-4)
    assert HungarianMatcher(cost_fn=kMaXMatchingCost(True))(outputs, targets)[0][0].tolist() == [0]
    assert HungarianMatcher(cost_fn=kMaXMatchingCost(False))(outputs, targets)[0][0].tolist() == [1]

    # Changing the logits on void pixels only leaves the masked cost alone, not the unmasked one.
    changed = dict(outputs, pred_masks=pred_masks.clone())
    changed["pred_masks"][0, :, 0, 1:] = torch.tensor([[-3.0, 1.0], [2.0, 0.5]])
    torch.testing.assert_close(kMaXMatchingCost(True)(image(changed, 0), targets[0]), masked)
    assert not torch.allclose(kMaXMatchingCost(False)(image(changed, 0), targets[0]), unmasked)


# ---------------------------------------------------------------------------------------------
# Each loss against its hand computation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masking", [True, False])
def test_pq_class_loss_hand_computed(masking):
    outputs, targets = hand_case()
    losses = criterion(FixedMatcher(HAND_PAIRS), ["labels"], masking_void_pixel=masking)(outputs, targets)
    assert set(losses) == {"loss_ce"}
    assert losses["loss_ce"].item() == pytest.approx(
        reference_class_loss(outputs, targets, HAND_PAIRS, masking), rel=1e-5
    )


def test_pq_weights_clamped_at_eos_coef():
    """A query whose mask is nowhere near void, or whose class probability is ~0, keeps the
    eos_coef weight rather than 0."""
    outputs, targets = hand_case()
    outputs["pred_masks"][1, 1] = -50.0  # query 1 of image 1 (unmatched) predicts nothing anywhere
    outputs["pred_masks"][1, 0] = torch.where(targets[1]["masks"][0] > 0, -50.0, 50.0)  # query 0 takes all void
    outputs["pred_logits"][0, 2, targets[0]["labels"][0]] = -50.0  # query 2 rules out its segment's class
    for eos in (1e-5, 0.1):
        losses = criterion(FixedMatcher(HAND_PAIRS), ["labels", "masks"], eos_coef=eos)(outputs, targets)
        assert losses["loss_ce"].item() == pytest.approx(
            reference_class_loss(outputs, targets, HAND_PAIRS, eos=eos), rel=1e-5
        )
        assert losses["loss_dice"].item() == pytest.approx(
            reference_dice_loss(outputs, targets, HAND_PAIRS, eos=eos), rel=1e-5
        )


@pytest.mark.parametrize("masking", [True, False])
def test_pq_dice_loss_and_mask_id_ce_hand_computed(masking):
    outputs, targets = hand_case()
    losses = criterion(FixedMatcher(HAND_PAIRS), ["masks"], masking_void_pixel=masking)(outputs, targets)
    assert set(losses) == {"loss_dice", "loss_mask"}
    assert losses["loss_dice"].item() == pytest.approx(
        reference_dice_loss(outputs, targets, HAND_PAIRS, masking), rel=1e-5
    )
    assert losses["loss_mask"].item() == pytest.approx(reference_mask_id_ce(outputs, targets, HAND_PAIRS), rel=1e-5)


def test_pixel_insdis_all_pixels_hand_computed():
    """sample_k >= H * W takes every pixel, so the loss is deterministic."""
    outputs, targets = hand_case()
    losses = criterion(FixedMatcher(HAND_PAIRS), ["pixels"], pixel_insdis_sample_k=1000)(outputs, targets)
    num_pixels = targets[0]["semantic_masks"].numel()
    expected = [
        reference_insdis(outputs["pixel_feature"][b], segment_ids(t), list(range(num_pixels)))
        for b, t in enumerate(targets)
    ]
    assert losses["loss_pixel_insdis"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def spy_on_sampler(monkeypatch) -> list[torch.Tensor]:
    """Record the indices the criterion's pixel sampler returns."""
    drawn = []
    original = kmax_module._gumbel_top_k

    def recording(logits, k):
        indices = original(logits, k)
        drawn.append(indices.clone())
        return indices

    monkeypatch.setattr(kmax_module, "_gumbel_top_k", recording)
    return drawn


def test_pixel_insdis_sampled_hand_computed(monkeypatch):
    outputs, targets = random_case(5, num_queries=4, num_segments=[3, 2], size=(5, 6))
    drawn = spy_on_sampler(monkeypatch)
    torch.manual_seed(0)
    losses = criterion(FixedMatcher([[(0, 0), (3, 1), (1, 2)], [(2, 0), (0, 1)]]), ["pixels"], pixel_insdis_sample_k=7)(
        outputs, targets
    )
    [indices] = drawn
    assert indices.shape == (2, 7)
    expected = []
    for b, target in enumerate(targets):
        ids = segment_ids(target)
        assert all(ids[p] >= 0 for p in indices[b].tolist()), "a void pixel was sampled with enough labelled ones"
        expected.append(reference_insdis(outputs["pixel_feature"][b], ids, indices[b].tolist()))
    assert losses["loss_pixel_insdis"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)


@pytest.mark.parametrize("channels", [K + 1, K])
def test_aux_semantic_full_ce_hand_computed(channels):
    outputs, targets = hand_case(semantic_channels=channels)
    targets[0]["semantic_masks"][0, 0] = IGNORE  # ignored even where a segment is labelled
    losses = criterion(FixedMatcher(HAND_PAIRS), ["aux_semantic"], aux_semantic_sample_k=0)(outputs, targets)
    num_pixels = targets[0]["semantic_masks"].numel()
    expected = [
        reference_semantic_ce(outputs["aux_semantic_pred"][b], t["semantic_masks"], list(range(num_pixels)))
        for b, t in enumerate(targets)
    ]
    assert losses["loss_aux_semantic"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_aux_semantic_sampled_hand_computed(monkeypatch):
    outputs, targets = random_case(6, num_queries=4, num_segments=[3, 2], size=(5, 6))
    targets[1]["semantic_masks"][targets[1]["masks"][1] > 0] = IGNORE  # a segment without semantic label
    drawn = spy_on_sampler(monkeypatch)
    torch.manual_seed(1)
    losses = criterion(
        FixedMatcher([[(0, 0), (3, 1), (1, 2)], [(2, 0), (0, 1)]]), ["aux_semantic"], aux_semantic_sample_k=9
    )(outputs, targets)
    [indices] = drawn
    assert indices.shape == (2, 9)
    expected = []
    for b, target in enumerate(targets):
        assert all(segment_ids(target)[p] >= 0 for p in indices[b].tolist())
        expected.append(
            reference_semantic_ce(outputs["aux_semantic_pred"][b], target["semantic_masks"], indices[b].tolist())
        )
    assert losses["loss_aux_semantic"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_aux_semantic_at_coarser_corner_aligned_resolution():
    """A 3 x 3 prediction for 5 x 5 targets reads the labels at every second pixel."""
    outputs, targets = random_case(7, num_queries=4, num_segments=[2], size=(5, 5))
    outputs["aux_semantic_pred"] = torch.randn(1, K + 1, 3, 3)
    losses = criterion(FixedMatcher([[(0, 0), (1, 1)]]), ["aux_semantic"], aux_semantic_sample_k=0)(outputs, targets)
    expected = reference_semantic_ce(
        outputs["aux_semantic_pred"][0], targets[0]["semantic_masks"][::2, ::2], list(range(9))
    )
    assert losses["loss_aux_semantic"].item() == pytest.approx(expected, rel=1e-5)


def test_sampler_prefers_small_segments_by_temperature():
    """Pixel p is drawn with probability proportional to (HW / area(p)) ** T: one 1-pixel segment,
    one 12-pixel segment and 3 void pixels (HW = 16); the first draw hits the small segment with
    probability 16^T / (16^T + 12 (16/12)^T)."""
    segments = torch.tensor([0] + [1] * 12 + [-1] * 3).view(1, 4, 4)
    outputs = {"pred_logits": torch.zeros(1, 2, K + 1), "pred_masks": torch.zeros(1, 2, 4, 4)}
    dense = criterion(FixedMatcher([[(0, 0), (1, 1)]]), ["labels"])._match(
        outputs, [target_from_map(segments[0], [0, 1])], with_semantic=False
    )
    expected_log_area = [math.log(16 / 1)] + [math.log(16 / 12)] * 12
    assert dense.log_inverse_area.flatten()[:13].tolist() == pytest.approx(expected_log_area, rel=1e-6)
    assert dense.void.flatten().tolist() == [False] * 13 + [True] * 3

    trials = 4000
    void = dense.void.expand(trials, -1, -1)
    log_inverse_area = dense.log_inverse_area.expand(trials, -1, -1)
    torch.manual_seed(0)
    for temperature in (0.0, 1.0, 2.0):
        first = kmax_module._sample_pixels(void, log_inverse_area, temperature, 1)[:, 0]
        small = 16.0**temperature
        assert (first == 0).float().mean().item() == pytest.approx(
            small / (small + 12 * (16 / 12) ** temperature), abs=0.03
        )
    # All labelled pixels before any void one; more samples than pixels are capped at H * W.
    assert kmax_module._sample_pixels(void[:50], log_inverse_area[:50], 1.5, 13).max().item() < 13
    assert kmax_module._sample_pixels(void[:2], log_inverse_area[:2], 1.5, 100).shape == (2, 16)


# ---------------------------------------------------------------------------------------------
# Criterion bookkeeping
# ---------------------------------------------------------------------------------------------


def with_aux(outputs: dict, num_aux: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    outputs = dict(outputs)
    outputs["aux_outputs"] = [
        {k: torch.randn(outputs[k].shape, generator=g) for k in ("pred_logits", "pred_masks", "pixel_feature")}
        for _ in range(num_aux)
    ]
    return outputs


@pytest.mark.parametrize("share,expected_calls", [(True, 1), (False, 4)])
def test_share_final_matching_calls_matcher_once(share, expected_calls):
    outputs, targets = random_case(8, num_queries=4, num_segments=[2, 3])
    outputs = with_aux(outputs, 3)
    matcher = CountingMatcher(HungarianMatcher(cost_fn=kMaXMatchingCost()))
    crit = criterion(matcher, num_aux=3, share_final_matching=share)
    crit(outputs, targets)
    assert matcher.calls == expected_calls


def test_aux_output_equal_to_final_gets_equal_losses():
    """Shared or not, the matching and PQ weights of a copy of the final output are the final ones."""
    outputs, targets = random_case(9, num_queries=4, num_segments=[2, 3])
    outputs["aux_outputs"] = [{k: outputs[k].clone() for k in ("pred_logits", "pred_masks", "pixel_feature")}]
    for share in (True, False):
        torch.manual_seed(0)
        losses = criterion(
            HungarianMatcher(cost_fn=kMaXMatchingCost()),
            num_aux=1,
            share_final_matching=share,
            pixel_insdis_sample_k=1000,
        )(outputs, targets)
        for name in ("loss_ce", "loss_dice", "loss_mask", "loss_pixel_insdis"):
            assert losses[f"{name}_0"].item() == pytest.approx(losses[name].item(), rel=1e-6)


def test_aux_outputs_keys_and_weighted_losses():
    outputs, targets = random_case(10, num_queries=4, num_segments=[2, 1])
    outputs = with_aux(outputs, 6)
    crit = criterion(HungarianMatcher(cost_fn=kMaXMatchingCost()), num_aux=6)
    losses = crit(outputs, targets)
    per_output = ["loss_ce", "loss_dice", "loss_mask", "loss_pixel_insdis"]
    assert set(losses) == set(per_output + ["loss_aux_semantic"]) | {f"{n}_{i}" for n in per_output for i in range(6)}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    weighted = crit.weighted_losses(losses)
    for name, value in losses.items():
        assert weighted[name].item() == pytest.approx(
            value.item() * WEIGHTS[name.rsplit("_", 1)[0] if name[-1].isdigit() else name]
        )
    with pytest.raises(KeyError, match="loss_ce_0"):
        criterion(HungarianMatcher(cost_fn=kMaXMatchingCost()), num_aux=0).weighted_losses(losses)


def test_gradients_reach_predictions_but_not_through_pq_weights():
    outputs, targets = random_case(12, num_queries=4, num_segments=[2, 3])
    outputs = with_aux(outputs, 2)
    leaves = [outputs[k] for k in ("pred_logits", "pred_masks", "pixel_feature", "aux_semantic_pred")]
    leaves += [aux[k] for aux in outputs["aux_outputs"] for k in ("pred_logits", "pred_masks", "pixel_feature")]
    for leaf in leaves:
        leaf.requires_grad_(True)
    crit = criterion(HungarianMatcher(cost_fn=kMaXMatchingCost()), num_aux=2)
    losses = crit(outputs, targets)
    grads = torch.autograd.grad(sum(crit.weighted_losses(losses).values()), leaves, retain_graph=True)
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0

    def depends(loss_name: str, tensor: torch.Tensor) -> bool:
        return torch.autograd.grad(losses[loss_name], tensor, retain_graph=True, allow_unused=True)[0] is not None

    # The class term's dice weights and the dice term's p(class) weights are constants, and the
    # auxiliary outputs' shared weights come from the final output without a gradient path.
    assert depends("loss_ce", outputs["pred_logits"]) and not depends("loss_ce", outputs["pred_masks"])
    assert depends("loss_dice", outputs["pred_masks"]) and not depends("loss_dice", outputs["pred_logits"])
    assert not depends("loss_ce_0", outputs["pred_masks"]) and not depends("loss_dice_0", outputs["pred_logits"])
    assert not depends("loss_pixel_insdis", outputs["pred_masks"])


def test_images_without_targets():
    outputs, targets = random_case(13, num_queries=4, num_segments=[0, 2])
    outputs = with_aux(outputs, 1)
    for tensor in (outputs["pred_logits"], outputs["pred_masks"]):
        tensor.requires_grad_(True)
    crit = criterion(HungarianMatcher(cost_fn=kMaXMatchingCost()), num_aux=1)
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_masks"].grad).all()

    # A batch with no segment at all: every query targets void with weight ~1 (all pixels void).
    outputs, targets = random_case(14, num_queries=4, num_segments=[0, 0])
    losses = criterion(HungarianMatcher(cost_fn=kMaXMatchingCost()))(outputs, targets)
    for name in ("loss_dice", "loss_mask", "loss_pixel_insdis", "loss_aux_semantic"):
        assert losses[name].item() == 0.0
    void_ce = torch.nn.functional.cross_entropy(outputs["pred_logits"].flatten(0, 1), torch.full((8,), K))
    assert losses["loss_ce"].item() == pytest.approx(0.25 * void_ce.item(), rel=1e-4)


def test_more_segments_than_queries():
    outputs, targets = random_case(15, num_queries=2, num_segments=[4, 1])
    losses = criterion(HungarianMatcher(cost_fn=kMaXMatchingCost()))(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_bad_inputs():
    outputs, targets = random_case(16, num_queries=4, num_segments=[2])
    matcher = HungarianMatcher(cost_fn=kMaXMatchingCost())
    crit = criterion(matcher)

    small = [dict(targets[0], masks=targets[0]["masks"][:, :2])]
    with pytest.raises(ValueError, match="pad and downsample the targets"):
        crit(outputs, small)
    with pytest.raises(ValueError, match="pad/resize the target masks"):
        kMaXMatchingCost()(image(outputs, 0), small[0])
    with pytest.raises(ValueError, match="K \\+ 1 = 4"):
        crit(dict(outputs, pred_logits=outputs["pred_logits"][..., :K]), targets)
    with pytest.raises(ValueError, match="pixel_feature"):
        crit({k: v for k, v in outputs.items() if k != "pixel_feature"}, targets)
    with pytest.raises(ValueError, match="aux_semantic_pred"):
        crit({k: v for k, v in outputs.items() if k != "aux_semantic_pred"}, targets)
    with pytest.raises(ValueError, match="K\\+1 or K"):
        crit(dict(outputs, aux_semantic_pred=outputs["aux_semantic_pred"][:, :2]), targets)
    with pytest.raises(ValueError, match="corner-aligned"):
        crit(dict(outputs, aux_semantic_pred=outputs["aux_semantic_pred"][..., :2, :3]), targets)
    # Even sizes: an integer ratio (64 targets, 8 predictions: 9) does not make the grids align.
    even_outputs, even_targets = random_case(16, num_queries=4, num_segments=[2], size=(64, 64))
    even_outputs["aux_semantic_pred"] = torch.randn(1, K + 1, 8, 8)
    with pytest.raises(ValueError, match="corner-aligned"):
        crit(even_outputs, even_targets)
    with pytest.raises(ValueError, match="semantic_masks"):
        crit(outputs, [{k: v for k, v in targets[0].items() if k != "semantic_masks"}])
    bad_semantic = targets[0]["semantic_masks"].clone()
    bad_semantic[0, 0] = K
    with pytest.raises(ValueError, match=r"labels \[3\]"):
        crit(outputs, [dict(targets[0], semantic_masks=bad_semantic)])
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        crit(outputs, [dict(targets[0], labels=torch.tensor([0, K]))])
    with pytest.raises(ValueError, match="resize every auxiliary prediction"):
        aux = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"][..., :2]}
        crit(dict(outputs, aux_outputs=[dict(aux, pixel_feature=outputs["pixel_feature"][..., :2])]), targets)
    with pytest.raises(ValueError, match="MASKING_VOID_PIXEL"):
        criterion(matcher, masking_void_pixel=False)
    with pytest.raises(ValueError, match="unknown losses"):
        criterion(matcher, ["labels", "boxes"])


# ---------------------------------------------------------------------------------------------
# What the losses keep for the backward pass
# ---------------------------------------------------------------------------------------------


def test_softmax_and_log_softmax_gradients():
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    probs, log_probs = kmax_module._softmax_and_log_softmax(logits)
    torch.testing.assert_close(probs, logits.softmax(1), rtol=0, atol=0)
    torch.testing.assert_close(log_probs, logits.log_softmax(1), rtol=0, atol=0)
    assert torch.autograd.gradcheck(kmax_module._softmax_and_log_softmax, (logits,))
    # Either output alone (the other's gradient is None).
    assert torch.autograd.gradcheck(lambda z: kmax_module._softmax_and_log_softmax(z)[0], (logits,))
    assert torch.autograd.gradcheck(lambda z: kmax_module._softmax_and_log_softmax(z)[1], (logits,))


def test_pixels_at_equals_gather_and_keeps_only_the_index():
    values = torch.randn(2, 3, 50, requires_grad=True)
    index = torch.stack([torch.randperm(50)[:7], torch.randperm(50)[:7]])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        picked = kmax_module._pixels_at(values, index)
    assert torch.equal(picked, values.gather(2, index[:, None].expand(-1, 3, -1)))
    assert all(t.untyped_storage().data_ptr() != values.untyped_storage().data_ptr() for t in saved)
    (grad,) = torch.autograd.grad((picked * torch.arange(7.0)).sum(), values)
    (expected,) = torch.autograd.grad((values.gather(2, index[:, None].expand(-1, 3, -1)) * torch.arange(7.0)).sum(), values)
    assert torch.equal(grad, expected)


def test_losses_keep_one_map_per_output_and_the_gradients_of_the_plain_formulas(monkeypatch):
    """Of the [B, N, L] / [B, D, L] maps, the mask losses keep the softmax only and the pixel and
    semantic losses none; the gradients equal those of plain softmax / log_softmax / gather."""
    with default_dtype(torch.float64):
        outputs, targets = random_case(17, num_queries=6, num_segments=[3, 2], size=(8, 9), dim=6)
        outputs = with_aux(outputs, 2)
    leaves = [outputs["pred_masks"], outputs["pixel_feature"], outputs["aux_semantic_pred"]]
    leaves += [aux[k] for aux in outputs["aux_outputs"] for k in ("pred_masks", "pixel_feature")]
    for leaf in leaves:
        leaf.requires_grad_(True)
    crit = criterion(FixedMatcher([[(0, 0), (3, 1), (1, 2)], [(2, 0), (5, 1)]]), ["masks", "pixels", "aux_semantic"],
                     num_aux=2, pixel_insdis_sample_k=20, aux_semantic_sample_k=20)

    def gradients() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        full_maps = []

        def pack(tensor):
            # Predictions (the targets, shared by all outputs, need no gradient).
            if tensor.requires_grad and tensor.dim() == 3 and tensor.shape[-1] == 8 * 9:
                full_maps.append(tensor)
            return tensor

        with default_dtype(torch.float64), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            losses = crit(outputs, targets)
        grads = torch.autograd.grad(sum(crit.weighted_losses(losses).values()), leaves)
        return list(grads), full_maps

    grads, kept = gradients()
    assert len(kept) == 3  # one softmax per output
    assert all(t.shape[1] == 6 for t in kept)
    monkeypatch.setattr(kmax_module, "_softmax_and_log_softmax", lambda z: (z.softmax(1), z.log_softmax(1)))
    monkeypatch.setattr(kmax_module, "_pixels_at", lambda v, i: v.gather(2, i[:, None].expand(-1, v.shape[1], -1)))
    plain_grads, plain_kept = gradients()
    assert len(plain_kept) > len(kept)
    for grad, plain in zip(grads, plain_grads):
        torch.testing.assert_close(grad, plain, rtol=1e-12, atol=1e-15)
