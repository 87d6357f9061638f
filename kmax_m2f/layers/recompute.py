"""Activation checkpointing, whole or selective, that leaves batch-norm running statistics as one
forward pass left them."""
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["checkpointed_call"]


@contextlib.contextmanager
def _running_stats_kept(module: Optional[nn.Module]) -> Iterator[None]:
    """Restore the running statistics of every batch norm in ``module`` on exit: the
    recomputation in backward is not a second training step, and a second update (or a second
    count in ``num_batches_tracked``) would shift the statistics evaluation uses."""
    modules = module.modules() if module is not None else ()
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        for norm, (mean, var, count) in zip(norms, saved):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)


# Operations whose outputs a selective recompute keeps: they cost far more to run again than the
# memory their outputs take, and the next operation (a norm) usually keeps that output anyway.
_COSTLY_OPS = frozenset({
    torch.ops.aten.convolution.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
})


def _keep_costly_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _COSTLY_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_call(
    function: Callable[..., Any], *inputs: torch.Tensor, enabled: bool = True, cheap_only: bool = False
) -> Any:
    """``function(*inputs)``, keeping only ``inputs`` for the backward pass, which runs
    ``function`` again to get what its own backward needs (``torch.utils.checkpoint``,
    non-reentrant).

    With ``cheap_only`` the outputs of the convolutions and matrix products inside ``function``
    are kept too, and only the other operations (activations, norms, copies) run again
    (selective checkpointing): e.g. a GELU read by a convolution, whose output the convolution
    would otherwise keep besides the GELU's input.

    ``function`` is a module, a method of one, or a function. The random state is replayed, so
    dropout and drop path draw the same in both passes; a module's batch norms update their
    running statistics once. Without gradients (inference), or not ``enabled`` (a model's
    activation-checkpoint switch off), it is a plain call.
    """
    if not (enabled and torch.is_grad_enabled()):
        return function(*inputs)
    owner = getattr(function, "__self__", function)
    owner = owner if isinstance(owner, nn.Module) else None

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        if not cheap_only:
            return contextlib.nullcontext(), _running_stats_kept(owner)
        forward_context, recompute_context = create_selective_checkpoint_contexts(_keep_costly_outputs)
        return forward_context, _both(recompute_context, _running_stats_kept(owner))

    # What a selective recompute keeps goes through any saved-tensor hooks around it (offloading,
    # or counting what is kept), as every other kept tensor does.
    return checkpoint(function, *inputs, use_reentrant=False, context_fn=contexts, respect_saved_tensors_hooks=True)


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield
