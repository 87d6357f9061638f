"""The ``refer`` dataset mapper: a referring record -> ReSTR's input, as the official code
prepares it (no augmentation): the image resized so that its longer side is INPUT.IMAGE_SIZE and
centred on a zero-padded square, the target mask likewise (training)."""
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import transforms as T
from PIL import Image

from ...data.datasets.checks import DatasetError
from ...data.datasets.refer import referent_mask
from ...data.mappers.build import MAPPER_REGISTRY
from ...data.mappers.common import image_to_tensor, read_image

__all__ = ["ReferringDatasetMapper", "resize_and_pad_box"]


def resize_and_pad_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, resized height, resized width) of an image scaled to fit a ``size`` square
    and centred in it (the official ``resize_and_pad``)."""
    scale = min(size / height, size / width)
    resized_h, resized_w = int(round(height * scale)), int(round(width * scale))
    return (size - resized_h) // 2, (size - resized_w) // 2, resized_h, resized_w


class ReferringDatasetMapper:
    """Record {"file_name", "sentence", "segmentation" / "mask_file", ...} -> {"image" [3, S, S]
    uint8, "sentence", "image_box", "height", "width", "ref_mask" [S, S] uint8 (training)}."""

    @configurable
    def __init__(self, is_train: bool = True, *, image_size: int, image_format: str = "RGB") -> None:
        self.is_train = is_train
        self.image_size = image_size
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        size = cfg.INPUT.IMAGE_SIZE
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"The refer mapper pads to a square: INPUT.IMAGE_SIZE must be one positive int, got {size!r}")
        return {"is_train": is_train, "image_size": size, "image_format": cfg.INPUT.FORMAT}

    def _square(self, array: np.ndarray, interpolation) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        height, width = array.shape[:2]
        box = resize_and_pad_box(height, width, self.image_size)
        top, left, resized_h, resized_w = box
        resized = T.ResizeTransform(height, width, resized_h, resized_w, interpolation).apply_image(array)
        square = np.zeros((self.image_size, self.image_size) + array.shape[2:], array.dtype)
        square[top : top + resized_h, left : left + resized_w] = resized
        return square, box

    def map_image(self, image: np.ndarray, sentence: str) -> dict[str, Any]:
        """An [H, W, 3] image (INPUT.FORMAT) and a sentence -> the model input (no target)."""
        if image.size == 0:
            raise DatasetError(f"Empty image of shape {image.shape}: nothing to segment.")
        square, box = self._square(image, Image.BILINEAR)
        return {
            "image": image_to_tensor(square),
            "sentence": sentence,
            "image_box": box,
            "height": image.shape[0],
            "width": image.shape[1],
        }

    def __call__(self, record: dict) -> dict[str, Any]:
        # A shallow copy suffices: the image reader may add the image size to the record, and
        # nothing nested is changed.
        record = dict(record)
        if not str(record.get("sentence", "")).strip():
            raise DatasetError(
                f"Referring record {record.get('sample_id')} of {record['file_name']} has an empty sentence: "
                "remove it from the dataset or give it a referring expression."
            )
        image = read_image(record, self.image_format)
        inputs = self.map_image(image, record["sentence"])
        if self.is_train:
            mask = referent_mask(record, image.shape[0], image.shape[1])
            if mask.shape != image.shape[:2]:
                raise DatasetError(
                    f"The target mask of {record['file_name']} (referent {record.get('ref_id')}) is "
                    f"{mask.shape[1]}x{mask.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}: the mask "
                    "belongs to another image."
                )
            square_mask, _ = self._square(mask.astype(np.uint8), Image.NEAREST)
            inputs["ref_mask"] = torch.from_numpy(square_mask)
        for key in ("file_name", "image_id", "ref_id", "sample_id"):
            if key in record:
                inputs[key] = record[key]
        return inputs


@MAPPER_REGISTRY.register()
def refer(cfg: CfgNode, is_train: bool = True) -> ReferringDatasetMapper:
    """ReSTR's mapper (INPUT.DATASET_MAPPER_NAME: refer)."""
    return ReferringDatasetMapper(cfg, is_train)
refer.maps_test_data = True
