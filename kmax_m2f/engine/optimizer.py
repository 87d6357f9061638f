"""Optimizer with Mask2Former / kMaX-DeepLab parameter groups and full-model gradient clipping."""
import logging
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import (
    _generate_optimizer_class_with_gradient_clipping,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)
from torch import nn

logger = logging.getLogger(__name__)

NORM_MODULE_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float,
    no_decay_names: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """One group per distinct (lr, weight_decay), detectron2-style.

    - parameters under a top-level ``backbone`` module (or the modules the model names in its
      attribute ``backbone_module_names``, e.g. ReSTR's official ``encoder_v``) get
      ``base_lr * backbone_multiplier``;
    - parameters of normalisation layers get ``weight_decay_norm``, of ``nn.Embedding``
      ``weight_decay_embed``;
    - parameters whose name contains one of ``no_decay_names`` (e.g. Swin's
      ``relative_position_bias_table``, ``absolute_pos_embed``) get no weight decay, nor those whose
      name contains one of the model's own ``no_weight_decay_keywords`` (a class attribute: the
      rule of its official recipe, so that it does not depend on each YAML repeating it), nor, when
      the model's class attribute ``no_weight_decay_on_vectors`` is True (LOCA's recipe), any
      parameter of at most one dimension (biases, norms).
    A parameter shared by several modules is counted once.
    """
    no_decay_names = tuple(no_decay_names) + tuple(getattr(model, "no_weight_decay_keywords", ()))
    no_decay_on_vectors = getattr(model, "no_weight_decay_on_vectors", False)
    backbone_names = tuple(getattr(model, "backbone_module_names", ("backbone",)))
    seen: set[int] = set()
    groups = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, decay = base_lr, weight_decay
            if module_name.split(".")[0] in backbone_names:
                lr *= backbone_multiplier
            if isinstance(module, NORM_MODULE_TYPES):
                decay = weight_decay_norm
            elif isinstance(module, nn.Embedding):
                decay = weight_decay_embed
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if any(name in full_name for name in no_decay_names) or (no_decay_on_vectors and param.ndim <= 1):
                decay = 0.0
            groups.append({"params": [param], "lr": lr, "weight_decay": decay})
    return reduce_param_groups(groups)


def _with_full_model_clipping(optimizer_type: type, max_norm: float) -> type:
    """Clip the gradient norm of all parameters together (Mask2Former's "full_model" clip type),
    which detectron2's per-parameter clippers do not offer."""

    def clip_all(params) -> None:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    return _generate_optimizer_class_with_gradient_clipping(optimizer_type, global_clipper=clip_all)


def _all_on_cpu(groups: list[dict[str, Any]]) -> bool:
    """Whether every parameter is a floating-point CPU tensor: there PyTorch's default optimizer
    step loops over the parameters one by one (56 ms of a 0.70 s step for the 541 tensors of a
    small kMaX model, 2 cores), while its fused kernel takes 15 ms
    (``python tools/benchmark.py optimizer``, BENCHMARKS.md). On a GPU
    the default is already the multi-tensor path, and a fused step there would skip the gradient
    scaler's unscaling before the gradient clipping of the optimizer's ``step``."""
    params = [param for group in groups for param in group["params"]]
    return bool(params) and all(param.device.type == "cpu" and param.is_floating_point() for param in params)


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW (``SOLVER.OPTIMIZER``) over :func:`build_param_groups`, with gradient clipping
    from ``SOLVER.CLIP_GRADIENTS`` (clip types "value", "norm" and "full_model")."""
    solver = cfg.SOLVER
    groups = build_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_embed=solver.WEIGHT_DECAY_EMBED,
        backbone_multiplier=solver.BACKBONE_MULTIPLIER,
        no_decay_names=tuple(solver.WEIGHT_DECAY_EXCLUDE),  # plus the model's own (see above)
    )
    name = solver.OPTIMIZER.upper()
    if name == "SGD":
        optimizer_type, kwargs = torch.optim.SGD, {"momentum": solver.MOMENTUM, "nesterov": solver.NESTEROV}
    elif name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={solver.OPTIMIZER!r} is not supported; use 'SGD' or 'ADAMW'.")

    if _all_on_cpu(groups):
        kwargs["fused"] = True

    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_type = _with_full_model_clipping(optimizer_type, clip.CLIP_VALUE)
    else:
        optimizer_type = maybe_add_gradient_clipping(cfg, optimizer_type)
    logger.info("optimizer %s with %d parameter groups", optimizer_type.__name__, len(groups))
    return optimizer_type(groups, lr=solver.BASE_LR, **kwargs)
