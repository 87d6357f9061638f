"""Referring-segmentation metrics: overall IoU (cumulative intersection / cumulative union over
the dataset), mean IoU (the average of per-sentence IoUs) and precision at IoU thresholds
(the fraction of sentences whose IoU reaches 0.5 ... 0.9), computed on masks at the original
image resolution, as the ReSTR / LAVT evaluations report them (in %)."""
import itertools
import logging
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.datasets.refer import image_segments, referent_mask

__all__ = ["PRECISION_THRESHOLDS", "ReferringEvaluator", "referring_metrics", "trivial_baselines"]

logger = logging.getLogger(__name__)

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def referring_metrics(intersections: np.ndarray, unions: np.ndarray) -> dict[str, float]:
    """{"oIoU", "mIoU", "Prec@0.5", ..., "Prec@0.9"} in % from per-sentence pixel counts. A sentence
    whose prediction and target are both empty has IoU 1."""
    intersections = np.asarray(intersections, np.float64)
    unions = np.asarray(unions, np.float64)
    if intersections.size == 0:
        raise ValueError("No predictions to evaluate.")
    ious = np.where(unions > 0, intersections / np.maximum(unions, 1), 1.0)
    metrics = {
        "oIoU": 100.0 * intersections.sum() / max(unions.sum(), 1.0),
        "mIoU": 100.0 * ious.mean(),
    }
    for threshold in PRECISION_THRESHOLDS:
        metrics[f"Prec@{threshold}"] = 100.0 * float((ious >= threshold).mean())
    return metrics


class ReferringEvaluator(DatasetEvaluator):
    """Compares each output's ``ref_mask`` [H, W] with its record's target mask (decoded from the
    dataset, matched by ``sample_id``); results are merged across processes."""

    def __init__(self, dataset_name: str, distributed: bool = True) -> None:
        self.dataset_name = dataset_name
        self.distributed = distributed
        self._records: Optional[dict] = None
        self.reset()

    def reset(self) -> None:
        self._counts: list[tuple[str, int, int]] = []

    def _record(self, sample_id: str) -> dict:
        if self._records is None:
            self._records = {r["sample_id"]: r for r in DatasetCatalog.get(self.dataset_name)}
        return self._records[sample_id]

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            prediction = out["ref_mask"].cpu().numpy().astype(bool)
            target = referent_mask(self._record(inp["sample_id"]), *prediction.shape)
            if target.shape != prediction.shape:
                raise ValueError(
                    f"{inp['sample_id']}: the prediction is {prediction.shape} but the target mask is {target.shape}"
                )
            intersection = int(np.logical_and(prediction, target).sum())
            union = int(np.logical_or(prediction, target).sum())
            self._counts.append((inp["sample_id"], intersection, union))

    def evaluate(self) -> Optional[OrderedDict]:
        counts = self._counts
        if self.distributed:
            comm.synchronize()
            counts = list(itertools.chain(*comm.gather(counts, dst=0)))
            if not comm.is_main_process():
                return None
        if not counts:
            logger.warning("ReferringEvaluator on %s received no predictions.", self.dataset_name)
            return OrderedDict()
        # A sample seen twice (a sampler that pads the last batch) counts once.
        unique = {sample_id: (i, u) for sample_id, i, u in counts}
        intersections, unions = zip(*unique.values())
        return OrderedDict(refer=referring_metrics(np.array(intersections), np.array(unions)))


def _largest_segment(segments: list, height: int, width: int) -> np.ndarray:
    masks = [referent_mask({"segmentation": s, "height": height, "width": width}) for s in segments]
    return max(masks, key=lambda m: int(m.sum()))


def _largest_segment_per_image(records: list[dict], instances_file: str) -> dict:
    """{image_id: its largest annotated segment}, each image decoded once (an image has many
    sentences)."""
    segments = image_segments(instances_file)
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in records}
    return {image_id: _largest_segment(segments[image_id], *size) for image_id, size in sizes.items()}


def trivial_baselines(dataset_name: str) -> dict[str, dict[str, float]]:
    """The metrics of two sentence-blind predictions on a refer-format dataset: "all foreground"
    (the whole image) and "largest segment" (the image's largest annotated segment)."""
    from detectron2.data import MetadataCatalog

    records = DatasetCatalog.get(dataset_name)
    largest = _largest_segment_per_image(records, MetadataCatalog.get(dataset_name).json_file)
    predictors: dict[str, Callable[[dict], np.ndarray]] = {
        "all foreground": lambda r: np.ones((r["height"], r["width"]), bool),
        "largest segment": lambda r: largest[r["image_id"]],
    }
    results = {}
    for name, predict in predictors.items():
        intersections, unions = [], []
        for record in records:
            prediction, target = predict(record), referent_mask(record)
            intersections.append(int(np.logical_and(prediction, target).sum()))
            unions.append(int(np.logical_or(prediction, target).sum()))
        results[name] = referring_metrics(np.array(intersections), np.array(unions))
    return results
