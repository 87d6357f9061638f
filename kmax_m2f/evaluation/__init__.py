from .build import build_evaluator, enabled_tasks
from .localization import LocalizationEvaluator

__all__ = ["LocalizationEvaluator", "build_evaluator", "enabled_tasks"]
