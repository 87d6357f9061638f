"""Activation checkpointing that leaves batch-norm running statistics as one forward pass left them."""
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def checkpointed_call(function: Callable[..., Any], *inputs: torch.Tensor, enabled: bool = True) -> Any:
    """``function(*inputs)``, keeping only ``inputs`` for the backward pass, which runs
    ``function`` again to get what its own backward needs (``torch.utils.checkpoint``,
    non-reentrant).

    ``function`` is a module or a method of one. The random state is replayed, so dropout and
    drop path draw the same in both passes; that module's batch norms update their running
    statistics once. Without gradients (inference), or not ``enabled`` (a model's
    activation-checkpoint switch off), it is a plain call.
    """
    if not (enabled and torch.is_grad_enabled()):
        return function(*inputs)
    owner = getattr(function, "__self__", function)
    owner = owner if isinstance(owner, nn.Module) else None
    return checkpoint(
        function, *inputs, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(owner)),
    )
