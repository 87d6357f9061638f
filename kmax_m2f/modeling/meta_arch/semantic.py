"""detectron2's ``SemanticSegmentor`` with a NUM_CLASSES check and, as an option, mmseg's
sliding-window inference (``TEST.SLIDING_WINDOW``), which StructToken's published ADE20K figures
use: the test image is covered by overlapping crops of the training size, each crop is segmented
alone, and the logits are averaged where crops overlap."""

from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.structures import ImageList

from ..postprocess import resize_to_output
from .common import check_num_classes
from .mask_classification import SEMANTIC

__all__ = ["SlidingWindowSemanticSegmentor", "sliding_windows"]


def sliding_windows(
    height: int, width: int, crop_size: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's crop grid over a ``height`` x ``width`` image: ``(y1, y2, x1, x2)`` windows of at
    most ``crop_size``, ``stride`` apart, the last row / column moved back to end at the border."""
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


@META_ARCH_REGISTRY.register()
class SlidingWindowSemanticSegmentor(SemanticSegmentor):
    """``SemanticSegmentor`` (training unchanged) whose inference can run on sliding windows.

    Without a ``test_crop_size`` it is detectron2's model as it is.
    """

    @classmethod
    def output_tasks(cls, cfg) -> set[str]:
        """Semantic segmentation only (what the evaluators are chosen for)."""
        return {SEMANTIC}

    @configurable
    def __init__(
        self,
        *,
        test_crop_size: Optional[tuple[int, int]] = None,
        test_stride: Optional[tuple[int, int]] = None,
        **kwargs,
    ) -> None:
        """
        Args:
            test_crop_size: (h, w) of the inference windows; None: whole-image inference.
            test_stride: (h, w) steps between windows (at most the crop size, so that every
                pixel is covered).
            kwargs: ``SemanticSegmentor``'s arguments.
        """
        super().__init__(**kwargs)
        if test_crop_size is not None:
            if test_stride is None or any(s <= 0 or s > c for s, c in zip(test_stride, test_crop_size)):
                raise ValueError(
                    f"TEST.SLIDING_WINDOW.STRIDE {test_stride} must be positive and at most CROP_SIZE "
                    f"{test_crop_size}, so that the windows cover the image."
                )
        self.test_crop_size = None if test_crop_size is None else tuple(test_crop_size)
        self.test_stride = None if test_stride is None else tuple(test_stride)

    @classmethod
    def from_config(cls, cfg) -> dict:
        check_num_classes(cfg)
        ret = super().from_config(cfg)
        window = cfg.TEST.SLIDING_WINDOW
        if window.ENABLED:
            ret.update(test_crop_size=tuple(window.CROP_SIZE), test_stride=tuple(window.STRIDE))
        return ret

    def forward(self, batched_inputs: list[dict]):
        if self.training or self.test_crop_size is None:
            return super().forward(batched_inputs)
        results = []
        for inputs in batched_inputs:
            image = (inputs["image"].to(self.device) - self.pixel_mean) / self.pixel_std
            logits = self.sliding_window_logits(image)
            height, width = image.shape[-2:]
            output_size = (inputs.get("height", height), inputs.get("width", width))
            results.append({"sem_seg": resize_to_output(logits, (height, width), *output_size)})
        return results

    def sliding_window_logits(self, image: torch.Tensor) -> torch.Tensor:
        """[C, H, W] normalised image -> [K, H, W] class logits averaged over the windows."""
        height, width = image.shape[-2:]
        windows = sliding_windows(height, width, self.test_crop_size, self.test_stride)
        crops = ImageList.from_tensors(
            [image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows],
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        crop_logits, _ = self.sem_seg_head(self.backbone(crops.tensor))  # [N, K, padded crop]
        summed = crop_logits.new_zeros((crop_logits.shape[1], height, width))
        counts = crop_logits.new_zeros((1, height, width))
        for (y1, y2, x1, x2), logits in zip(windows, crop_logits):
            summed[:, y1:y2, x1:x2] += logits[:, : y2 - y1, : x2 - x1]
            counts[:, y1:y2, x1:x2] += 1
        return summed / counts
