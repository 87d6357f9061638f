"""Choose detectron2's evaluators from a dataset's ``evaluator_type`` and the model's tasks."""
import logging
from typing import Callable, Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
)

from ..modeling.meta_arch.common import INSTANCE, LOCALIZATION, PANOPTIC, REFER, SEMANTIC
from .localization import LocalizationEvaluator
from .referring import ReferringEvaluator
from .semantic import SemSegEvaluator

logger = logging.getLogger(__name__)


# evaluator_type -> {task: evaluator factory(dataset_name, output_dir)}.
_EVALUATORS: dict[str, dict[str, Callable[[str, Optional[str]], DatasetEvaluator]]] = {
    "sem_seg": {SEMANTIC: lambda name, out: SemSegEvaluator(name, distributed=True, output_dir=out)},
    "coco": {INSTANCE: lambda name, out: COCOEvaluator(name, output_dir=out)},
    "coco_panoptic_seg": {
        PANOPTIC: lambda name, out: COCOPanopticEvaluator(name, out),
        INSTANCE: lambda name, out: COCOEvaluator(name, output_dir=out),
        SEMANTIC: lambda name, out: SemSegEvaluator(name, distributed=True, output_dir=out),
    },
    "ade20k_panoptic_seg": {
        PANOPTIC: lambda name, out: COCOPanopticEvaluator(name, out),
        SEMANTIC: lambda name, out: SemSegEvaluator(name, distributed=True, output_dir=out),
    },
    "refer": {REFER: lambda name, out: ReferringEvaluator(name)},
    "cityscapes_sem_seg": {SEMANTIC: lambda name, out: CityscapesSemSegEvaluator(name)},
    "cityscapes_instance": {INSTANCE: lambda name, out: CityscapesInstanceEvaluator(name)},
    "cityscapes_panoptic_seg": {
        PANOPTIC: lambda name, out: COCOPanopticEvaluator(name, out),
        SEMANTIC: lambda name, out: CityscapesSemSegEvaluator(name),
        INSTANCE: lambda name, out: CityscapesInstanceEvaluator(name),
    },
}

def enabled_tasks(cfg: CfgNode) -> Optional[set[str]]:
    """The tasks the configured model predicts at test time, as its meta-architecture declares
    them (a classmethod ``output_tasks(cfg) -> set[str]``), or None when it declares none (it is
    then evaluated on every task its dataset supports)."""
    output_tasks = getattr(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), "output_tasks", None)
    return None if output_tasks is None else set(output_tasks(cfg))


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """Evaluators for ``dataset_name``. A single-task dataset (``sem_seg``, ``coco``, ...) always
    gets its evaluator; a panoptic dataset gets one per task the model has switched on; a model
    that predicts patch localisation only (LOCA) gets :class:`LocalizationEvaluator` on any
    dataset."""
    tasks = enabled_tasks(cfg)
    if tasks == {LOCALIZATION}:
        # Needs the images only: any dataset will do, whatever its labels.
        return LocalizationEvaluator((cfg.INPUT.LOCA.REFERENCE_SIZE // cfg.MODEL.VIT.PATCH_SIZE) ** 2)
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type")
    if evaluator_type not in _EVALUATORS:
        raise ValueError(
            f"Dataset '{dataset_name}' has evaluator_type={evaluator_type!r}, which kmax_m2f cannot "
            f"evaluate. Set MetadataCatalog.get({dataset_name!r}).evaluator_type to one of "
            f"{sorted(_EVALUATORS)} when registering it."
        )
    by_task = _EVALUATORS[evaluator_type]
    if tasks is None or len(by_task) == 1:
        tasks = set(by_task)
    selected = [task for task in (PANOPTIC, INSTANCE, SEMANTIC, REFER) if task in tasks and task in by_task]
    if not selected:
        raise ValueError(
            f"The model predicts {sorted(tasks)}, but dataset '{dataset_name}' ({evaluator_type}) can "
            f"only be evaluated on {sorted(by_task)}. Switch the matching TEST.*_ON flag on, or "
            f"evaluate on another dataset."
        )
    skipped = tasks - set(by_task)
    if skipped:
        logger.warning("Dataset '%s' (%s) has no evaluator for %s: not evaluated there.",
                       dataset_name, evaluator_type, sorted(skipped))
    evaluators = [by_task[task](dataset_name, output_folder) for task in selected]
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
