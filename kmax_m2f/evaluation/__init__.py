from .build import build_evaluator, enabled_tasks

__all__ = ["build_evaluator", "enabled_tasks"]
