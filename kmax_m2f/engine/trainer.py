"""The project's trainer: detectron2's DefaultTrainer with the pieces these models need."""
import functools
import logging
import os
from typing import Optional
from unittest import mock

import torch
from detectron2.config import CfgNode
from detectron2.data import build as detectron2_data_build
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer
from detectron2.engine.hooks import LRScheduler
from detectron2.engine import defaults as detectron2_defaults
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import build_mapper, build_test_mapper
from ..data.datasets.checks import missing_files_named
from ..evaluation import build_evaluator
from .checkpoint import Checkpointer
from .lr_scheduler import build_lr_scheduler
from .resume import RandomStates, ResumableTrainingSampler
from .optimizer import build_optimizer

logger = logging.getLogger(__name__)


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when more than one process runs.

    detectron2's helper always passes ``device_ids=[local_rank]``, which DDP rejects for a CPU
    module; a CPU model (gloo backend) is wrapped without device ids instead.
    """
    if comm.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).device.type == "cuda"
    device_ids = [comm.get_local_rank()] if on_gpu else None
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)


class CPUAutocast(nn.Module):
    """Runs the wrapped model's training forward under CPU bfloat16 autocast (``SOLVER.AMP`` on a
    CPU, where detectron2's AMPTrainer needs CUDA). bfloat16 keeps float32's exponent range, so
    gradients need no loss scaling; inference (``eval()``) stays in float32. oneDNN runs bfloat16
    convolutions and matrix products on AMX / AVX512-BF16 units where the CPU has them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.training):
            return self.module(*args, **kwargs)


def cpu_runs_bfloat16_natively() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX-512 core, AMX, Arm bf16) - PyTorch's
    own test. Elsewhere it emulates them: a synthetic Mask2Former step took 16x longer in bfloat16
    than in float32 with oneDNN held to AVX2 (BENCHMARKS.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def build_train_loop(cfg: CfgNode, model: nn.Module, data_loader, optimizer) -> SimpleTrainer:
    """detectron2's SimpleTrainer, or with ``SOLVER.AMP.ENABLED`` its AMPTrainer (float16 with
    loss scaling) on a GPU and bfloat16 autocast (:class:`CPUAutocast`) on a CPU that runs
    bfloat16 natively (float32 elsewhere, with a warning: emulated bfloat16 is far slower)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    if next(model.parameters()).device.type == "cuda":
        return AMPTrainer(model, data_loader, optimizer)
    if not cpu_runs_bfloat16_natively():
        logger.warning(
            "SOLVER.AMP.ENABLED: this CPU has no native bfloat16 kernels (oneDNN would emulate them, "
            "many times slower than float32), so training runs in float32. Set SOLVER.AMP.ENABLED False "
            "to silence this."
        )
        return SimpleTrainer(model, data_loader, optimizer)
    logger.info("SOLVER.AMP on the CPU: training forward passes under bfloat16 autocast")
    return SimpleTrainer(CPUAutocast(model), data_loader, optimizer)


class Trainer(DefaultTrainer):
    """DefaultTrainer with: the evaluator chosen from the dataset's ``evaluator_type``, the
    training mapper chosen by ``INPUT.DATASET_MAPPER_NAME``, AdamW/SGD with per-module parameter
    groups and full-model gradient clipping, poly / multi-step / cosine schedules with warm-up, and
    DistributedDataParallel that also works on CPU."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__ has no hook for two of its steps: its create_ddp_model cannot
        # wrap a CPU model (it always passes device ids), and with SOLVER.AMP it builds an
        # AMPTrainer, which needs CUDA. Both names are swapped for this module's while it runs.
        # Its checkpointer is swapped the same way for the atomic one (engine/checkpoint.py).
        with mock.patch.object(detectron2_defaults, "create_ddp_model", create_ddp_model), mock.patch.object(
            detectron2_defaults, "AMPTrainer", functools.partial(build_train_loop, cfg)
        ), mock.patch.object(detectron2_defaults, "DetectionCheckpointer", Checkpointer):
            super().__init__(cfg)
        self.checkpointer.checkpointables["random_states"] = RandomStates()

    def resume_or_load(self, resume: bool = True) -> None:
        """detectron2's, then the training sampler moved to where the run being resumed was."""
        super().resume_or_load(resume=resume)
        sampler = getattr(self._trainer.data_loader, "training_sampler", None)
        if sampler is not None and self.start_iter > 0:
            sampler.start = self.start_iter * (self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
            logger.info("Training data continues at index %d of this process's sampler order.", sampler.start)

    def build_hooks(self) -> list[HookBase]:
        """detectron2's hooks, plus those the model asks for (its ``training_hooks()``, e.g. LOCA's
        teacher update), placed right after the lr scheduler so that they run before the
        checkpointer and the evaluation of the same iteration."""
        hooks = super().build_hooks()
        model = self.model
        while not hasattr(model, "training_hooks") and hasattr(model, "module"):
            model = model.module
        extra = model.training_hooks() if hasattr(model, "training_hooks") else []
        position = next((i + 1 for i, hook in enumerate(hooks) if isinstance(hook, LRScheduler)), 0)
        return hooks[:position] + list(extra) + hooks[position:]

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """detectron2's loader; with its default sampler, a :class:`ResumableTrainingSampler`,
        kept as the loader's ``training_sampler``."""
        samplers = []

        def resumable_sampler(*args, **kwargs) -> ResumableTrainingSampler:
            samplers.append(ResumableTrainingSampler(*args, **kwargs))
            return samplers[-1]

        with mock.patch.object(detectron2_data_build, "TrainingSampler", resumable_sampler), missing_files_named(
            list(cfg.DATASETS.TRAIN)
        ):
            data_loader = build_detection_train_loader(cfg, mapper=build_mapper(cfg, is_train=True))
        data_loader.training_sampler = samplers[0] if samplers else None
        return data_loader

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        with missing_files_named([dataset_name]):
            return build_detection_test_loader(cfg, dataset_name, mapper=build_test_mapper(cfg))

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer):
        return build_lr_scheduler(cfg, optimizer)
