from .checkpoint import Checkpointer, CheckpointError
from .launch import launch
from .optimizer import build_optimizer, build_param_groups
from .trainer import Trainer, create_ddp_model

__all__ = ["CheckpointError", "Checkpointer", "Trainer", "build_optimizer", "launch", "build_param_groups", "create_ddp_model"]
