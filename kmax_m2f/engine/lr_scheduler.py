"""Learning-rate schedules: detectron2's (and its DeepLab project's) plus deeplab2's warmup-poly,
which kMaX-DeepLab's recipes name ``TF2WarmupPolyLR``."""
import torch
from detectron2.config import CfgNode
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver import LRMultiplier
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)

__all__ = ["TF2PolyParamScheduler", "build_lr_scheduler", "tf2_warmup_poly_multiplier"]


class TF2PolyParamScheduler(ParamScheduler):
    """``(1 - where) ** power``, held at ``constant_ending`` once it would fall below it (when
    ``constant_ending`` > 0). ``where`` is the fraction of *all* iterations, warmup included."""

    def __init__(self, power: float, constant_ending: float = 0.0):
        self.power = power
        self.constant_ending = constant_ending

    def __call__(self, where: float) -> float:
        value = (1.0 - where) ** self.power
        if self.constant_ending > 0:
            return max(value, self.constant_ending)
        return value


def tf2_warmup_poly_multiplier(
    max_iter: int, warmup_iters: int, warmup_factor: float, warmup_method: str, power: float, constant_ending: float,
    poly_after_warmup: bool = False,
) -> ParamScheduler:
    """deeplab2's schedule as a multiplier of the base lr: during warmup the warmup factor alone
    (rising linearly from ``warmup_factor`` to 1, or constant), then the poly decay of the whole
    run. detectron2's WarmupPolyLR differs: its warmup ramps to the decayed value, and it multiplies
    the two. With ``poly_after_warmup`` the decay spans only the iterations after warmup,
    ``(1 - (it - warmup) / (max_iter - warmup)) ** power`` (ReSTR's official schedule)."""
    poly = TF2PolyParamScheduler(power, constant_ending)
    if warmup_iters <= 0:
        return poly
    if warmup_method == "linear":
        warmup = LinearParamScheduler(warmup_factor, 1.0)
    elif warmup_method == "constant":
        warmup = ConstantParamScheduler(warmup_factor)
    else:
        raise ValueError(f"SOLVER.WARMUP_METHOD must be 'linear' or 'constant', got {warmup_method!r}")
    warmup_length = min(warmup_iters / max_iter, 1.0)
    return CompositeParamScheduler(
        [warmup, poly],
        interval_scaling=["rescaled", "rescaled" if poly_after_warmup else "fixed"],
        lengths=[warmup_length, 1.0 - warmup_length],
    )


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """``SOLVER.LR_SCHEDULER_NAME``: TF2WarmupPolyLR, WarmupThenPolyLR (the decay starts after the
    warmup: ReSTR's), or any of detectron2's (WarmupMultiStepLR, WarmupCosineLR,
    WarmupStepWithFixedGammaLR) and its DeepLab project's (WarmupPolyLR)."""
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME in ("TF2WarmupPolyLR", "WarmupThenPolyLR"):
        multiplier = tf2_warmup_poly_multiplier(
            solver.MAX_ITER, solver.WARMUP_ITERS, solver.WARMUP_FACTOR, solver.WARMUP_METHOD,
            solver.POLY_LR_POWER, solver.POLY_LR_CONSTANT_ENDING,
            poly_after_warmup=solver.LR_SCHEDULER_NAME == "WarmupThenPolyLR",
        )
        return LRMultiplier(optimizer, multiplier=multiplier, max_iter=solver.MAX_ITER)
    return build_deeplab_lr_scheduler(cfg, optimizer)
