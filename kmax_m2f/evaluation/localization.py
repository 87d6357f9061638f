"""Top-1 patch localisation accuracy of LOCA on held-out images."""
import itertools
import logging
from collections import OrderedDict

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["LocalizationEvaluator"]

logger = logging.getLogger(__name__)


class LocalizationEvaluator(DatasetEvaluator):
    """Sums the ``{"localization": {"correct", "valid"}}`` outputs of every image over all
    processes: the share of query patches (inside the reference view) whose reference position
    is predicted top-1, in percent, next to chance (100 / number of reference positions)."""

    def __init__(self, num_positions: int):
        self.num_positions = num_positions
        self._counts: list[tuple[int, int]] = []

    def reset(self) -> None:
        self._counts = []

    def process(self, inputs, outputs) -> None:
        for output in outputs:
            self._counts.append((output["localization"]["correct"], output["localization"]["valid"]))

    def evaluate(self):
        counts = list(itertools.chain(*comm.gather(self._counts, dst=0)))
        if not comm.is_main_process():
            return {}
        correct = sum(c for c, _ in counts)
        valid = sum(v for _, v in counts)
        if valid == 0:
            logger.warning("LocalizationEvaluator: no query patch fell inside its reference view; nothing to score.")
            return {}
        return OrderedDict(
            localization={
                "top1": 100.0 * correct / valid,
                "chance": 100.0 / self.num_positions,
                "patches": float(valid),
                "images": float(len(counts)),
            }
        )
