"""HungarianMatcher against brute force, each loss against hand-computed values, SetCriterion's
bookkeeping (no-object weight, auxiliary outputs, empty images, normalisation, gradients)."""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn

from kmax_m2f.modeling.losses import (
    batch_dice_loss,
    batch_sigmoid_ce_loss,
    calculate_uncertainty,
    dice_loss,
    sigmoid_ce_loss,
)
from kmax_m2f.modeling.matcher import HungarianMatcher
from kmax_m2f.modeling.set_criterion import build_weight_dict, num_masks_across_workers
from kmax_m2f.systems.mask2former.criterion import SetCriterion

LN2, LN3 = math.log(2.0), math.log(3.0)


def pixel_centres(h: int, w: int) -> torch.Tensor:
    """[h*w, 2] (x, y) points at the pixel centres, row-major: point_sample there (with
    align_corners=False) reads the pixels exactly, so sampled masks equal flattened masks."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def random_case(seed: int, num_queries: int, num_targets: list[int], num_classes: int = 3, size: int = 4):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(len(num_targets), num_queries, num_classes + 1, generator=g),
        "pred_masks": 3 * torch.randn(len(num_targets), num_queries, size, size, generator=g),
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "masks": torch.rand(n, size, size, generator=g) > 0.5,
        }
        for n in num_targets
    ]
    return outputs, targets


def reference_mask_former_cost(outputs_b, target, weights=(2.0, 5.0, 5.0)) -> torch.Tensor:
    """The Mask2Former cost, pair by pair from its definition, on all pixels."""
    prob = outputs_b["pred_logits"].softmax(-1)
    pred = outputs_b["pred_masks"].flatten(1)
    tgt = target["masks"].flatten(1).float()
    cost = torch.empty(len(pred), len(tgt))
    for q, n in itertools.product(range(len(pred)), range(len(tgt))):
        p = pred[q].sigmoid()
        bce = F.binary_cross_entropy_with_logits(pred[q], tgt[n])
        dice = 1 - (2 * (p * tgt[n]).sum() + 1) / (p.sum() + tgt[n].sum() + 1)
        cost[q, n] = -weights[0] * prob[q, target["labels"][n]] + weights[1] * bce + weights[2] * dice
    return cost


def brute_force(cost: torch.Tensor) -> tuple[list[tuple[int, int]], float]:
    """Optimal one-to-one (pred, target) pairs of a [Q, N] cost by trying every injection."""
    num_queries, num_targets = cost.shape
    best_pairs, best_total = None, math.inf
    if num_queries >= num_targets:
        candidates = (
            [(p, n) for n, p in enumerate(perm)] for perm in itertools.permutations(range(num_queries), num_targets)
        )
    else:
        candidates = (
            [(q, n) for q, n in enumerate(perm)] for perm in itertools.permutations(range(num_targets), num_queries)
        )
    for pairs in candidates:
        total = sum(cost[q, n].item() for q, n in pairs)
        if total < best_total:
            best_pairs, best_total = sorted(pairs), total
    return best_pairs, best_total


def assert_optimal(indices, costs):
    for (pred, tgt), cost in zip(indices, costs):
        assert pred.dtype == tgt.dtype == torch.int64
        assert torch.equal(pred, pred.sort().values)
        expected_pairs, expected_total = brute_force(cost)
        assert list(zip(pred.tolist(), tgt.tolist())) == expected_pairs
        assert cost[pred, tgt].sum().item() == pytest.approx(expected_total, abs=1e-5)


# ----------------------------------------------------------------------------- losses


def test_losses_hand_values():
    inputs = torch.tensor([[0.0, LN3]])  # sigmoid: 1/2, 3/4
    targets = torch.tensor([[1.0, 0.0]])
    # BCE: -log(1/2) = log 2 and -log(1 - 3/4) = log 4, mean 1.5 log 2.
    assert sigmoid_ce_loss(inputs, targets, 1.0).item() == pytest.approx(1.5 * LN2)
    assert sigmoid_ce_loss(inputs, targets, 2.0).item() == pytest.approx(0.75 * LN2)
    # Dice: 1 - (2 * 1/2 + 1) / (5/4 + 1 + 1) = 5/13.
    assert dice_loss(inputs, targets, 1.0).item() == pytest.approx(5 / 13)
    # Masks are summed, then divided by num_masks.
    two = torch.cat([inputs, inputs]), torch.cat([targets, targets])
    assert dice_loss(*two, 4.0).item() == pytest.approx(2 * (5 / 13) / 4)
    # Pairwise versions, one pair.
    assert batch_sigmoid_ce_loss(inputs, targets).item() == pytest.approx(1.5 * LN2)
    assert batch_dice_loss(inputs, targets).item() == pytest.approx(5 / 13)
    # Uncertainty: highest where the logit is nearest 0.
    assert torch.equal(calculate_uncertainty(torch.tensor([[[-2.0, 0.5]]])), torch.tensor([[[-2.0, -0.5]]]))


def test_pairwise_losses_equal_unbatched_losses_per_pair():
    g = torch.Generator().manual_seed(0)
    inputs = 4 * torch.randn(5, 11, generator=g)
    targets = (torch.rand(3, 11, generator=g) > 0.5).float()
    targets[0] = torch.rand(11, generator=g)  # bilinear sampling gives fractional targets
    ce, dice = batch_sigmoid_ce_loss(inputs, targets), batch_dice_loss(inputs, targets)
    assert ce.shape == dice.shape == (5, 3)
    for q, n in itertools.product(range(5), range(3)):
        pair = inputs[q : q + 1], targets[n : n + 1]
        assert ce[q, n].item() == pytest.approx(sigmoid_ce_loss(*pair, 1.0).item(), rel=1e-5)
        assert dice[q, n].item() == pytest.approx(dice_loss(*pair, 1.0).item(), rel=1e-5)


# ----------------------------------------------------------------------------- matcher


def test_mask_former_cost_matches_its_definition():
    outputs, targets = random_case(0, num_queries=4, num_targets=[3])
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=16)
    outputs_b = {k: v[0] for k, v in outputs.items()}
    cost = matcher.mask_former_cost(outputs_b, targets[0], point_coords=pixel_centres(4, 4))
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost, reference_mask_former_cost(outputs_b, targets[0]))
    # Each weight multiplies its own term.
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=3.0, cost_dice=7.0, num_points=16)
    cost = matcher.mask_former_cost(outputs_b, targets[0], point_coords=pixel_centres(4, 4))
    torch.testing.assert_close(cost, reference_mask_former_cost(outputs_b, targets[0], weights=(1.0, 3.0, 7.0)))
    # Float32 whatever the prediction dtype.
    half = {k: v.bfloat16() for k, v in outputs_b.items()}
    assert matcher.mask_former_cost(half, targets[0]).dtype == torch.float32


@pytest.mark.parametrize("num_queries,num_targets", [(4, [3, 1, 2]), (4, [4]), (2, [3])])
def test_matcher_mask_former_cost_vs_brute_force(num_queries, num_targets):
    outputs, targets = random_case(1, num_queries, num_targets)
    base = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=16)
    # Same cost with the points injected (pixel centres), so the reference can be exact.
    matcher = HungarianMatcher(cost_fn=functools.partial(base.mask_former_cost, point_coords=pixel_centres(4, 4)))
    indices = matcher(outputs, targets)
    costs = [reference_mask_former_cost({k: v[b] for k, v in outputs.items()}, t) for b, t in enumerate(targets)]
    assert [len(pred) for pred, _ in indices] == [min(num_queries, n) for n in num_targets]
    assert_optimal(indices, costs)


def test_matcher_custom_cost_vs_brute_force():
    """A kMaX-like cost (-dice similarity x p_class) plugs in through cost_fn."""

    def neg_dice_times_prob(outputs_b, target):
        prob = outputs_b["pred_logits"].softmax(-1)[:, target["labels"]]
        dice = 1 - batch_dice_loss(outputs_b["pred_masks"].flatten(1), target["masks"].flatten(1).float())
        return -dice * prob

    outputs, targets = random_case(2, num_queries=5, num_targets=[3, 2])
    indices = HungarianMatcher(cost_fn=neg_dice_times_prob)(outputs, targets)
    costs = [neg_dice_times_prob({k: v[b] for k, v in outputs.items()}, t) for b, t in enumerate(targets)]
    assert_optimal(indices, costs)


def test_matcher_default_random_points_recovers_permutation():
    """With the default uniform points, predictions that are permuted copies of the targets
    are matched back to them."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 8, 8, generator=g) > 0.5
    labels = torch.tensor([2, 0, 1])
    preds_of_targets = [3, 0, 2]  # target n is copied into query preds_of_targets[n]
    pred_masks = torch.full((1, 4, 8, 8), -10.0)
    pred_logits = torch.zeros(1, 4, 4)
    for n, q in enumerate(preds_of_targets):
        pred_masks[0, q] = 10.0 * (2 * masks[n].float() - 1)
        pred_logits[0, q, labels[n]] = 5.0
    targets = [{"labels": labels, "masks": masks}]
    torch.manual_seed(0)
    [(pred, tgt)] = HungarianMatcher(2.0, 5.0, 5.0, num_points=64)(
        {"pred_logits": pred_logits, "pred_masks": pred_masks}, targets
    )
    assert pred.tolist() == [0, 2, 3]
    assert tgt.tolist() == [1, 2, 0]


def test_matcher_images_without_targets():
    outputs, targets = random_case(4, num_queries=3, num_targets=[0, 2, 0])
    indices = HungarianMatcher(2.0, 5.0, 5.0, num_points=16)(outputs, targets)
    for (pred, tgt), n in zip(indices, [0, 2, 0]):
        assert len(pred) == len(tgt) == n
        assert pred.dtype == tgt.dtype == torch.int64


def test_matcher_errors():
    outputs, targets = random_case(5, num_queries=3, num_targets=[2])
    outputs["pred_logits"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        HungarianMatcher(2.0, 5.0, 5.0, num_points=16)(outputs, targets)
    outputs, _ = random_case(5, num_queries=3, num_targets=[2])
    with pytest.raises(FloatingPointError):
        HungarianMatcher(cost_fn=lambda o, t: torch.full((3, 2), math.inf))(outputs, targets)
    with pytest.raises(ValueError, match="shape"):
        HungarianMatcher(cost_fn=lambda o, t: torch.zeros(2, 3))(outputs, targets)
    with pytest.raises(ValueError):
        HungarianMatcher(0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        HungarianMatcher(num_points=0)


# ----------------------------------------------------------------------------- criterion


class PixelCentreCriterion(SetCriterion):
    """Reads every pixel of the predicted mask once, making the mask losses exact."""

    def sample_points(self, mask_logits):
        h, w = mask_logits.shape[-2:]
        return pixel_centres(h, w)[None].expand(len(mask_logits), -1, -1)


class FixedMatcher:
    """Returns given indices and records the outputs it was called with."""

    def __init__(self, indices):
        self.indices = indices
        self.calls = []

    def __call__(self, outputs, targets):
        self.calls.append(outputs)
        return self.indices


def make_criterion(matcher, cls=SetCriterion, num_classes=1, num_points=16, losses=("labels", "masks")):
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    return cls(
        num_classes=num_classes,
        matcher=matcher,
        weight_dict=build_weight_dict(weights, 9),
        eos_coef=0.1,
        losses=list(losses),
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )


def hand_case():
    """One image, K = 1, two queries; query 1 is matched to the only target (class 0)."""
    outputs = {
        "pred_logits": torch.tensor([[[0.0, 0.0], [LN3, 0.0]]], requires_grad=True),
        "pred_masks": torch.tensor([[[[9.0, 9.0], [9.0, 9.0]], [[0.0, LN3], [-LN3, 0.0]]]], requires_grad=True),
    }
    targets = [{"labels": torch.tensor([0]), "masks": torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])}]
    return outputs, targets


# Query 0 -> no-object (weight 0.1): CE log 2; query 1 -> class 0: CE -log(3/4); weighted mean.
HAND_CE = (math.log(4 / 3) + 0.1 * LN2) / 1.1
# Pixels (logit, target): (0, 1) log 2, (log 3, 0) log 4, (-log 3, 0) log(4/3), (0, 1) log 2.
HAND_MASK = (6 * LN2 - LN3) / 4
# sigmoid = (1/2, 3/4, 1/4, 1/2): 1 - (2 * 1 + 1) / (2 + 2 + 1).
HAND_DICE = 2 / 5


def test_criterion_hand_values():
    outputs, targets = hand_case()
    criterion = make_criterion(FixedMatcher([(torch.tensor([1]), torch.tensor([0]))]), PixelCentreCriterion)
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    assert losses["loss_ce"].item() == pytest.approx(HAND_CE)
    assert losses["loss_mask"].item() == pytest.approx(HAND_MASK)
    assert losses["loss_dice"].item() == pytest.approx(HAND_DICE)
    # The real matcher picks the same query.
    losses = make_criterion(HungarianMatcher(2.0, 5.0, 5.0, num_points=64), PixelCentreCriterion)(outputs, targets)
    assert losses["loss_mask"].item() == pytest.approx(HAND_MASK)


def test_criterion_target_masks_of_other_resolutions():
    """Targets are read at the same normalised points: a 4x4 (nearest-upsampled) and a 2x2 copy
    of the same mask give the same losses, also mixed in one batch."""
    outputs, targets = hand_case()
    big = {
        "labels": targets[0]["labels"],
        "masks": targets[0]["masks"].repeat_interleave(2, 1).repeat_interleave(2, 2).bool(),
    }
    batch = {k: torch.cat([v, v]).detach() for k, v in outputs.items()}
    matcher = FixedMatcher([(torch.tensor([1]), torch.tensor([0]))] * 2)
    losses = make_criterion(matcher, PixelCentreCriterion)(batch, [targets[0], big])
    # Two masks, normalised by 2: the mean of two equal per-mask losses.
    assert losses["loss_mask"].item() == pytest.approx(HAND_MASK)
    assert losses["loss_dice"].item() == pytest.approx(HAND_DICE)


def test_criterion_normalised_by_masks_averaged_across_workers(monkeypatch):
    outputs, targets = hand_case()
    criterion = make_criterion(FixedMatcher([(torch.tensor([1]), torch.tensor([0]))]), PixelCentreCriterion)
    assert num_masks_across_workers(targets, torch.device("cpu")) == 1.0
    assert num_masks_across_workers([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0  # clamped

    def all_reduce(tensor):  # the other worker holds 3 masks
        tensor += 3

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert num_masks_across_workers(targets, torch.device("cpu")) == 2.0
    losses = criterion(outputs, targets)
    assert losses["loss_mask"].item() == pytest.approx(HAND_MASK / 2)
    assert losses["loss_dice"].item() == pytest.approx(HAND_DICE / 2)
    assert losses["loss_ce"].item() == pytest.approx(HAND_CE)  # a mean over queries, not per mask


def test_empty_weight_buffer():
    criterion = make_criterion(FixedMatcher([]), num_classes=4)
    assert "empty_weight" in dict(criterion.named_buffers())
    assert "empty_weight" not in dict(criterion.named_parameters())
    torch.testing.assert_close(criterion.empty_weight, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1]))
    holder = nn.Module()
    holder.criterion = criterion
    assert "criterion.empty_weight" in holder.state_dict()


def test_aux_outputs_rematched_and_suffixed():
    outputs, targets = random_case(6, num_queries=3, num_targets=[2, 1])
    outputs["aux_outputs"] = [{k: v.clone() for k, v in outputs.items()} for _ in range(2)]
    matcher = FixedMatcher([(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([0]))])
    losses = make_criterion(matcher, PixelCentreCriterion, num_classes=3)(outputs, targets)
    names = ["loss_ce", "loss_mask", "loss_dice"]
    assert set(losses) == set(names) | {f"{n}_{i}" for n in names for i in range(2)}
    assert len(matcher.calls) == 3 and all("aux_outputs" not in call for call in matcher.calls)
    for name in names:  # identical aux outputs give identical losses
        assert losses[f"{name}_1"].item() == pytest.approx(losses[name].item())


def test_images_without_targets():
    outputs, targets = random_case(7, num_queries=3, num_targets=[0, 0])
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    criterion = make_criterion(HungarianMatcher(2.0, 5.0, 5.0, num_points=16), num_classes=3)
    losses = criterion(outputs, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert math.isfinite(losses["loss_ce"].item())
    sum(losses.values()).backward()
    # Connected to the graph (DDP needs a gradient), but zero.
    assert outputs["pred_masks"].grad is not None and not outputs["pred_masks"].grad.any()

    # An empty image next to the hand case changes neither mask loss.
    hand_outputs, hand_targets = hand_case()
    batch = {k: torch.cat([v, v]).detach() for k, v in hand_outputs.items()}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 2, 2)}
    matcher = FixedMatcher([(torch.tensor([1]), torch.tensor([0])), (torch.zeros(0, dtype=torch.int64),) * 2])
    losses = make_criterion(matcher, PixelCentreCriterion)(batch, [hand_targets[0], empty])
    assert losses["loss_mask"].item() == pytest.approx(HAND_MASK)
    assert losses["loss_dice"].item() == pytest.approx(HAND_DICE)


def test_gradients_reach_logits_and_masks_of_every_output():
    outputs, targets = random_case(8, num_queries=4, num_targets=[2, 3], size=8)
    outputs["aux_outputs"] = [{k: v.clone().requires_grad_() for k, v in outputs.items()}]
    for k in ("pred_logits", "pred_masks"):
        outputs[k].requires_grad_()
    criterion = make_criterion(HungarianMatcher(2.0, 5.0, 5.0, num_points=32), num_classes=3, num_points=20)
    losses = criterion(outputs, targets)
    total = sum(criterion.weighted_losses(losses).values())
    total.backward()
    for out in (outputs, outputs["aux_outputs"][0]):
        assert out["pred_logits"].grad.abs().sum() > 0
        assert out["pred_masks"].grad.abs().sum() > 0


def test_importance_sampling_prefers_uncertain_points():
    # Logits 0 (uncertain) on the left half, 20 on the right: with importance ratio 1 every point
    # comes from the uncertain side.
    logits = torch.zeros(1, 1, 8, 8)
    logits[..., 4:] = 20.0
    criterion = make_criterion(FixedMatcher([]), num_points=50)
    criterion.importance_sample_ratio = 1.0
    torch.manual_seed(0)
    points = criterion.sample_points(logits)
    assert points.shape == (1, 50, 2)
    assert (points[0, :, 0] < 0.5).all()


def test_weight_dict_and_weighted_losses():
    weight_dict = build_weight_dict({"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}, 9)
    assert len(weight_dict) == 30 and weight_dict["loss_ce_8"] == 2.0 and weight_dict["loss_dice_0"] == 5.0
    criterion = make_criterion(FixedMatcher([]))
    weighted = criterion.weighted_losses({"loss_ce": torch.tensor(1.5), "loss_mask_3": torch.tensor(2.0)})
    assert weighted["loss_ce"].item() == 3.0 and weighted["loss_mask_3"].item() == 10.0
    with pytest.raises(KeyError, match="loss_ce_9"):
        criterion.weighted_losses({"loss_ce_9": torch.tensor(1.0)})


def test_criterion_bad_input():
    outputs, targets = random_case(9, num_queries=3, num_targets=[2], num_classes=3)
    criterion = make_criterion(HungarianMatcher(2.0, 5.0, 5.0, num_points=16), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        criterion(outputs, targets)
    criterion = make_criterion(HungarianMatcher(2.0, 5.0, 5.0, num_points=16), num_classes=3)
    targets[0]["labels"][0] = 3
    with pytest.raises(ValueError, match="outside"):
        criterion(outputs, targets)
    with pytest.raises(ValueError, match="unknown losses"):
        make_criterion(FixedMatcher([]), losses=("labels", "boxes"))
