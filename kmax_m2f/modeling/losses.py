"""Binary mask losses on sampled points, shared by the matcher (pairwise costs) and the criteria.

Shape shorthand: M matched masks, Q predictions, N targets, P points per mask. Inputs are mask
logits sampled at P points; targets are the ground-truth masks sampled at the same points, with
values in [0, 1] (bilinear sampling of a binary mask gives fractions near its border).
"""

import torch.nn.functional as F
from torch import Tensor


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy with logits, averaged over the points of each mask, summed over the
    masks and divided by ``num_masks``.

    Args:
        inputs: [M, P] mask logits.
        targets: [M, P] target values in [0, 1].
        num_masks: normaliser (the number of target masks, averaged across workers).

    Returns:
        Scalar tensor.
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with p = sigmoid(inputs), summed over the
    masks and divided by ``num_masks``. The +1 keeps empty-vs-empty at zero loss.

    Args:
        inputs: [M, P] mask logits.
        targets: [M, P] target values in [0, 1].
        num_masks: normaliser.

    Returns:
        Scalar tensor.
    """
    probs = inputs.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def batch_sigmoid_ce_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """``sigmoid_ce_loss`` between every prediction and every target, without building the
    [Q, N, P] tensor.

    Per point, BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x) = softplus(x) - t * x, so the
    pairwise sum over points is one row sum plus one matrix product.

    Args:
        inputs: [Q, P] prediction logits.
        targets: [N, P] target values in [0, 1].

    Returns:
        [Q, N] mean BCE over the P points.
    """
    num_points = inputs.shape[1]
    loss = F.softplus(inputs).sum(-1)[:, None] - inputs @ targets.t()
    return loss / num_points


def batch_dice_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """``dice_loss`` between every prediction and every target (one matrix product).

    Args:
        inputs: [Q, P] prediction logits.
        targets: [N, P] target values in [0, 1].

    Returns:
        [Q, N] dice loss.
    """
    probs = inputs.sigmoid()
    numerator = 2 * (probs @ targets.t())
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """PointRend uncertainty of class-agnostic mask logits: points whose logit is nearest 0
    (probability nearest 0.5) are the most uncertain.

    Args:
        logits: [R, 1, P] mask logits.

    Returns:
        [R, 1, P] uncertainty, highest where the prediction is least certain.
    """
    return -logits.abs()
