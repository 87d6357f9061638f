"""LOCA's losses: patch localisation and MSN-style patch cluster prediction."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm

__all__ = ["cluster_prediction_losses", "global_mean", "localization_loss", "sinkhorn"]


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if comm.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def sinkhorn(assignments: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Balance soft assignments [M, K] (rows: patches of this process, columns: prototypes)
    with Sinkhorn-Knopp: each iteration divides every column by its sum over all processes'
    rows, then every row by its own sum. Rows of the result sum to 1; columns tend to equal
    totals (each prototype used about as often)."""
    for _ in range(iterations):
        assignments = assignments / _all_reduce_sum(assignments.sum(dim=0, keepdim=True))
        assignments = assignments / assignments.sum(dim=1, keepdim=True)
    return assignments


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` [M, K] over its rows and over every process's rows, [K]; the
    gradient flows through this process's rows only."""
    local_sum = values.sum(dim=0)
    total = _all_reduce_sum(torch.stack([local_sum.detach(), local_sum.new_full(local_sum.shape, values.shape[0])]))
    others = total[0] - local_sum.detach()
    return (local_sum + others) / total[1].clamp(min=1)


def localization_loss(logits: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy of ``logits`` [N, P] against reference ``positions`` [N] (-1: the
    patch is outside the reference and takes no part), averaged over the valid patches.

    Returns the loss and the number of correct top-1 predictions among the valid patches."""
    valid = positions >= 0
    if not valid.any():
        return logits.sum() * 0.0, logits.new_zeros((), dtype=torch.long)
    valid_logits, valid_positions = logits[valid], positions[valid]
    correct = (valid_logits.argmax(dim=-1) == valid_positions).sum()
    return F.cross_entropy(valid_logits.float(), valid_positions), correct


def cluster_prediction_losses(
    student_logits: torch.Tensor,
    teacher_targets: torch.Tensor,
    positions: torch.Tensor,
    student_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSN-style patch cluster prediction.

    Args:
        student_logits: [N, K] prototype similarities of the query patches.
        teacher_targets: [N, K] the (Sinkhorn-balanced) teacher assignments at each patch's
            reference position; rows of invalid patches are ignored.
        positions: [N] the reference position, -1 for patches outside the reference.
        student_temperature: the student's softmax temperature.

    Returns:
        cross-entropy between targets and the student's assignments over the valid patches, and
        the mean-entropy regulariser sum(p log p) of the student's average assignment over all
        patches of all processes (minimising it spreads the patches over the prototypes).
    """
    log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    valid = positions >= 0
    if valid.any():
        cross_entropy = -(teacher_targets[valid] * log_probs[valid]).sum(dim=-1).mean()
    else:
        cross_entropy = log_probs.sum() * 0.0
    mean_probs = global_mean(log_probs.exp())
    neg_entropy = (mean_probs * torch.log(mean_probs.clamp(min=1e-12))).sum()
    return cross_entropy, neg_entropy
