"""What the Mask2Former-style training mappers share (and the helpers every mapper uses).

Every mapper here does the same five steps; only how labels are read and turned into per-segment
masks differs (semantic PNG, COCO-panoptic PNG, COCO instance annotations):

1. read the image (any PIL mode; ``INPUT.FORMAT`` converts grey / RGBA / palette images) and check
   its size against the record and the label files;
2. read the labels and check their class ids against ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``;
3. augment the image and the labels with one random transform;
4. pad the image (value 128) and ``sem_seg`` (ignore label) to a multiple of ``SIZE_DIVISIBILITY``;
5. build ``Instances`` with ``gt_classes`` [N] int64 and ``gt_masks`` [N, H, W] bool.

:class:`MaskFormerMapperBase` holds that pipeline; the subclasses fill in steps 2 and 5.
"""

import abc
import copy
import logging
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import Instances, polygons_to_bitmask
from torch.nn import functional as F

from ..datasets.checks import DatasetError
from ..file_cache import NO_CACHE, DecodedFileCache
from ..images import read_image as read_image_file
from ...config import fixed_image_size

logger = logging.getLogger(__name__)

# Mid-grey, as the official mappers use: close to the ImageNet pixel mean, so padded pixels are
# about 0 once the model normalises the image.
IMAGE_PAD_VALUE = 128

NUM_CLASSES_KEY = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"


# ---------------------------------------------------------------------------------------------
# Augmentations
# ---------------------------------------------------------------------------------------------
def flip_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """``RandomFlip`` as ``INPUT.RANDOM_FLIP`` asks ("horizontal", "vertical" or "none").

    The official non-LSJ mappers always flip horizontally; honouring the key gives the same
    result for every config that leaves it at its default ("horizontal")."""
    if cfg.INPUT.RANDOM_FLIP == "none":
        return []
    return [
        T.RandomFlip(
            horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
            vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
        )
    ]


def resize_crop_flip_augmentations(cfg: CfgNode, category_area_crop: bool) -> list[Any]:
    """Mask2Former's ADE20K / Cityscapes recipe: shortest-edge resize, optional crop, optional
    SSD colour jitter, flip.

    Args:
        category_area_crop: crop with ``RandomCrop_CategoryAreaConstraint`` (semantic and
            panoptic mappers: no single class may cover more than
            ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` of the crop) instead of a plain
            ``RandomCrop`` (instance mapper, which has no semantic map to measure areas on).
    """
    augmentations: list[Any] = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        if category_area_crop:
            augmentations.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
                )
            )
        else:
            augmentations.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.COLOR_AUG_SSD:
        augmentations.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    return augmentations + flip_augmentations(cfg)


def lsj_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """Large-scale jitter (COCO recipe): flip, resize so that the image fits
    ``[MIN_SCALE, MAX_SCALE] x IMAGE_SIZE``, then crop / pad (image 128, labels 255) to exactly
    ``IMAGE_SIZE`` (an int: a square; or [H, W])."""
    height, width = fixed_image_size(cfg)
    return flip_augmentations(cfg) + [
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE,
            max_scale=cfg.INPUT.MAX_SCALE,
            target_height=height,
            target_width=width,
        ),
        T.FixedSizeCrop(crop_size=(height, width)),
    ]


def ignore_label_from_config(cfg: CfgNode) -> int:
    """The ignore label of the first training set's metadata (as the official mappers read it),
    else ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``."""
    default = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    if not cfg.DATASETS.TRAIN:
        return default
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", default)


# ---------------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------------
def read_image(record: dict, image_format: str, cache: DecodedFileCache = NO_CACHE) -> np.ndarray:
    """[H, W, C] image of ``record["file_name"]`` in ``image_format`` (detectron2's reader, which
    converts grey, RGBA and palette images; 16-bit ones are scaled to 8 bits first), checked
    against the record's width / height. From ``cache`` (read-only) when it holds the file."""
    path = record["file_name"]
    image = cache.get(("image", path, image_format), lambda: read_image_file(path, format=image_format))
    utils.check_image_size(record, image)
    return image


def check_label_size(label: np.ndarray, label_file: str, image: np.ndarray, image_file: str) -> None:
    """A label map must cover its image pixel for pixel; resizing one of them by hand is a
    common conversion mistake, and detectron2's transforms would only fail with a bare assert."""
    if label.shape[:2] != image.shape[:2]:
        raise DatasetError(
            f"{label_file} is {label.shape[1]}x{label.shape[0]} (WxH) but its image {image_file} is "
            f"{image.shape[1]}x{image.shape[0]}: labels must have the image's size."
        )


def check_class_ids(
    class_ids: Iterable[int], num_classes: Optional[int], ignore_label: Optional[int], source: str
) -> None:
    """Raise a :class:`DatasetError` if a class id (other than the ignore label) is outside
    ``[0, num_classes)``: the model would index past its classifier, or silently learn nothing
    for those classes. ``num_classes=None`` disables the check."""
    if num_classes is None:
        return
    bad = sorted({int(c) for c in class_ids if (c < 0 or c >= num_classes) and c != ignore_label})
    if bad:
        ignore = f" and differ from the ignore label {ignore_label}" if ignore_label is not None else ""
        raise DatasetError(
            f"{source} has class id(s) {bad[:10]} that are >= {NUM_CLASSES_KEY}={num_classes}"
            f"{ignore}. Set {NUM_CLASSES_KEY} to the dataset's number of classes (the classes are "
            f"numbered 0..N-1 contiguously), or fix the labels."
        )


def read_sem_seg(
    record: dict,
    image: np.ndarray,
    num_classes: Optional[int],
    ignore_label: int,
    cache: DecodedFileCache = NO_CACHE,
) -> np.ndarray:
    """[H, W] float64 semantic labels of ``record["sem_seg_file_name"]``, checked; ``cache``
    keeps the decoded file (its class ids checked when first read).

    float64 because detectron2 resizes non-uint8 maps with ``torch`` interpolation, which has no
    integer kernels; it holds 8- and 16-bit labels exactly and picks the same pixels as the
    official mappers do."""
    path = record["sem_seg_file_name"]
    sem_seg = cache.get(
        ("sem_seg", path, num_classes, ignore_label),
        lambda: _read_checked_sem_seg(path, num_classes, ignore_label),
    )
    check_label_size(sem_seg, path, image, record["file_name"])
    return sem_seg.astype(np.float64)


def _read_checked_sem_seg(path: str, num_classes: Optional[int], ignore_label: int) -> np.ndarray:
    """[H, W] labels of ``path`` as decoded (8 or 16 bit), with their class ids checked."""
    sem_seg = utils.read_image(path)
    if sem_seg.ndim != 2:
        raise DatasetError(
            f"{path} has {sem_seg.shape[2]} channels; semantic label PNGs hold one class id per "
            f"pixel (a single-channel 'L', 'P' or 16-bit image), not colours."
        )
    check_class_ids(np.unique(sem_seg), num_classes, ignore_label, path)
    return sem_seg


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
def pad_to_multiple(tensor: torch.Tensor, size_divisibility: int, value: Union[int, float]) -> torch.Tensor:
    """Pad the last two dims of ``tensor`` at the bottom / right to multiples of
    ``size_divisibility`` (no-op when it is <= 0).

    The official mappers pad to exactly ``size_divisibility`` (their configs set it to the crop
    size), which silently crops any larger image; rounding up gives the same result for images
    no larger than that and keeps every pixel otherwise."""
    if size_divisibility <= 0:
        return tensor
    height, width = tensor.shape[-2:]
    padding = (0, -width % size_divisibility, 0, -height % size_divisibility)
    return F.pad(tensor, padding, value=value).contiguous()


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, C] array -> [C, H, W] tensor, same dtype. A tensor (not an array) travels through
    the data loader's worker queues in shared memory instead of being pickled. The tensor owns
    its memory when ``image`` is read-only (a cached file)."""
    channels_first = np.ascontiguousarray(image.transpose(2, 0, 1))
    if not channels_first.flags.writeable:
        channels_first = channels_first.copy()
    return torch.as_tensor(channels_first)


def stack_masks(masks: list[np.ndarray], height: int, width: int) -> torch.Tensor:
    """[N, H, W] bool tensor of N [H, W] masks; [0, H, W] when there are none, so that an image
    without segments still trains (on the no-object class only)."""
    if not masks:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.stack([torch.from_numpy(np.ascontiguousarray(m, dtype=bool)) for m in masks])


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """[H, W] bool mask of one transformed COCO annotation: polygons stay polygons through
    detectron2's transforms, RLEs come back as decoded arrays."""
    if isinstance(segmentation, list):
        return polygons_to_bitmask(segmentation, height, width)
    if isinstance(segmentation, np.ndarray) and segmentation.ndim == 2:
        return segmentation.astype(bool)
    raise DatasetError(
        f"Cannot turn a segmentation of type {type(segmentation).__name__} into a mask; expected "
        f"polygons (list of [x0, y0, x1, y1, ...]), a COCO RLE dict or a 2-D array."
    )


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
class MaskFormerMapperBase(abc.ABC):
    """Turns one catalog record into Mask2Former's training input (training only):

    - ``"image"``: [C, H, W] uint8 tensor (C = 3 for RGB / BGR), augmented and padded;
    - ``"sem_seg"``: [H, W] int64 tensor, when the record has semantic labels (padding = ignore);
    - ``"instances"``: :class:`Instances` of size (H, W) with ``gt_classes`` [N] int64
      (contiguous ids) and ``gt_masks`` [N, H, W] bool (N may be 0).

    Subclasses implement :meth:`read_labels` and :meth:`segments`.
    """

    # Crop with RandomCrop_CategoryAreaConstraint (needs a semantic map) rather than RandomCrop.
    category_area_crop = True

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[Any],
        image_format: str,
        size_divisibility: int = -1,
        ignore_label: int = 255,
        num_classes: Optional[int] = None,
        decoded_file_cache_mb: float = 0.0,
    ):
        """
        Args:
            is_train: must be True: these mappers build training targets; evaluation reads
                images with detectron2's ``DatasetMapper``.
            augmentations: detectron2 augmentations or transforms, applied in order.
            image_format: a format of :func:`detectron2.data.detection_utils.read_image`.
            size_divisibility: pad image and labels to multiples of this (<= 0: no padding).
            ignore_label: semantic label of unlabelled pixels (also the padding of ``sem_seg``).
            num_classes: labels must lie in ``[0, num_classes)``; None: no check.
            decoded_file_cache_mb: keep up to this many MiB of decoded images and label maps in
                memory, per process (:class:`DecodedFileCache`); 0: read every time.
        """
        if not is_train:
            raise ValueError(
                f"{type(self).__name__} builds training targets only; evaluation reads images with "
                f"detectron2's DatasetMapper."
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.file_cache = DecodedFileCache.from_mib(decoded_file_cache_mb)
        # RandomCrop_CategoryAreaConstraint measures class areas on the semantic map.
        self._crop_needs_sem_seg = any(
            isinstance(a, T.RandomCrop_CategoryAreaConstraint) and a.single_category_max_area < 1.0
            for a in augmentations
        )
        logger.info(f"[{type(self).__name__}] Augmentations used in training: {augmentations}")

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": resize_crop_flip_augmentations(cfg, cls.category_area_crop),
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "ignore_label": ignore_label_from_config(cfg),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "decoded_file_cache_mb": cfg.DATALOADER.DECODED_FILE_CACHE_MB,
        }

    @abc.abstractmethod
    def read_labels(self, record: dict, image: np.ndarray) -> tuple[Optional[np.ndarray], Any]:
        """Read and check the record's labels (popping the fields the model must not see).

        Returns:
            the [H, W] float64 semantic map to augment along with the image (None if the record
            has none), and whatever :meth:`segments` needs, in the un-augmented geometry.
        """

    @abc.abstractmethod
    def segments(
        self, labels: Any, transforms: T.TransformList, aug_input: T.AugInput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``gt_classes`` [N] int64 and ``gt_masks`` [N, h, w] bool in the augmented geometry
        (h, w = ``aug_input.image.shape[:2]``, before padding)."""

    def finish(self, record: dict, transforms: T.TransformList, input_hw: tuple[int, int]) -> None:
        """Last changes to the output ``record`` (in place); ``input_hw`` is the image size
        before augmentation."""

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: one record in detectron2's dataset format (not modified).

        Returns:
            the record plus ``"image"``, ``"instances"`` and (when available) ``"sem_seg"``.
        """
        record = copy.deepcopy(dataset_dict)
        image = read_image(record, self.image_format, self.file_cache)
        sem_seg, labels = self.read_labels(record, image)
        if sem_seg is None and self._crop_needs_sem_seg:
            raise DatasetError(
                f"{record['file_name']}: INPUT.CROP.SINGLE_CATEGORY_MAX_AREA < 1 needs semantic "
                f"labels (sem_seg_file_name) to measure class areas, and this record has none. "
                f"Register the dataset with its semantic PNGs or set the key to 1.0."
            )

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        classes, masks = self.segments(labels, transforms, aug_input)

        image_tensor = pad_to_multiple(
            image_to_tensor(aug_input.image), self.size_divisibility, IMAGE_PAD_VALUE
        )
        padded_hw = tuple(image_tensor.shape[-2:])
        record["image"] = image_tensor
        if aug_input.sem_seg is not None:
            sem_seg_tensor = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
            record["sem_seg"] = pad_to_multiple(sem_seg_tensor, self.size_divisibility, self.ignore_label)
        record["instances"] = Instances(
            padded_hw, gt_classes=classes, gt_masks=pad_to_multiple(masks, self.size_divisibility, False)
        )
        self.finish(record, transforms, image.shape[:2])
        return record
