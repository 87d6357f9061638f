"""detectron2's SemSegEvaluator, reporting its results as tables instead of one raw dict."""
import logging
import math
from collections import OrderedDict

from detectron2.evaluation import SemSegEvaluator as Detectron2SemSegEvaluator
from detectron2.utils.logger import create_small_table
from tabulate import tabulate

__all__ = ["SemSegEvaluator", "format_sem_seg_results"]

logger = logging.getLogger(__name__)
SUMMARY_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")


def format_sem_seg_results(results: dict[str, float], class_names: list[str]) -> str:
    """The summary (mIoU, fwIoU, mACC, pACC) and one row per class (IoU, boundary IoU when
    computed, accuracy), as markdown tables."""
    summary = create_small_table({key: results[key] for key in SUMMARY_KEYS})
    with_boundary = any(f"BoundaryIoU-{name}" in results for name in class_names)
    headers = ["class", "IoU"] + (["Boundary IoU"] if with_boundary else []) + ["ACC"]
    rows = []
    for name in class_names:
        values = [results.get(f"IoU-{name}")] + ([results.get(f"BoundaryIoU-{name}")] if with_boundary else [])
        values.append(results.get(f"ACC-{name}"))
        # NaN: the class is absent from the ground truth of this split.
        rows.append([name] + ["-" if v is None or math.isnan(v) else f"{v:.2f}" for v in values])
    per_class = tabulate(rows, headers=headers, tablefmt="pipe", stralign="right")
    return f"{summary}\nPer class:\n{per_class}"


class _DropRawResults(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(record.msg, dict)


class SemSegEvaluator(Detectron2SemSegEvaluator):
    """:class:`detectron2.evaluation.SemSegEvaluator` (same metrics and files) whose log shows
    the results as tables (:func:`format_sem_seg_results`)."""

    def evaluate(self) -> OrderedDict | None:
        raw_results_filter = _DropRawResults()
        self._logger.addFilter(raw_results_filter)
        try:
            results = super().evaluate()
        finally:
            self._logger.removeFilter(raw_results_filter)
        if results:
            logger.info("Semantic segmentation results:\n%s", format_sem_seg_results(results["sem_seg"], self._class_names))
        return results
