"""``kmax_panoptic``: kMaX-DeepLab's panoptic training mapper, with panoptic copy-paste.

One training sample is built from two COCO-panoptic records of the training set(s):

1. the main record is augmented with scale jitter (``T.ResizeScale`` by
   ``[MIN_SCALE, MAX_SCALE] x IMAGE_SIZE``), a random crop to at most ``IMAGE_SIZE``, a flip and
   (``INPUT.COLOR_AUG_SSD``) SSD colour jitter, then placed top-left on a zero ``IMAGE_SIZE``
   canvas;
2. a random partner record gets the same pipeline with the scale range halved; all its thing
   segments and a random subset of its stuff segments are pasted over the main image;
3. the targets are read on every 4th pixel (stride 4, ``label[::4, ::4]``): one mask per
   non-crowd segment still visible, the stuff of one class from both images merged into one mask;
4. a sample left without masks, or with too few labelled pixels, is drawn again.

The behavioural reference is the official PyTorch port (bytedance/kmax-deeplab,
``PanoptickMaXDeepLabDatasetMapper``), except that the copy-paste partners come from the
configured training sets' catalog entries rather than from dataset paths fixed in the mapper, and
thing / stuff comes from the records (or the dataset metadata), not from hard-coded class ranges.
"""

import copy
import logging
import random
from dataclasses import dataclass
from typing import Any, Collection, Optional, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import DatasetCatalog, DatasetFromList, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import Instances
from detectron2.utils.logger import log_every_n_seconds

from ...config import ConfigError, fixed_image_size
from ...data.datasets.checks import DatasetError
from ...data.file_cache import DecodedFileCache
from ...data.mappers import MAPPER_REGISTRY
from ...data.mappers.common import check_class_ids, check_label_size, flip_augmentations, image_to_tensor, read_image
from ...data.panoptic import VOID_ID, check_segment_areas, panoptic_ids, read_panoptic_png

__all__ = ["KMaXPanopticDatasetMapper", "kmax_augmentations", "kmax_panoptic"]

logger = logging.getLogger(__name__)

# Targets are kept on every LABEL_STRIDE-th pixel: the resolution of kMaX's final mask logits.
LABEL_STRIDE = 4
# The official mapper draws again when a sample has at most this many labelled stride-4 pixels.
OFFICIAL_LABELED_PIXELS_THRESHOLD = 4096
# The copy-paste partner is augmented with the scale range times this.
PARTNER_SCALE_RATIO = 0.5


def kmax_augmentations(cfg: CfgNode, scale_ratio: float = 1.0) -> list[Any]:
    """kMaX-DeepLab's training augmentations: resize to ``[MIN_SCALE, MAX_SCALE] x scale_ratio``
    times ``INPUT.IMAGE_SIZE`` (aspect ratio kept), crop to at most ``IMAGE_SIZE``, flip
    (``INPUT.RANDOM_FLIP``) and SSD colour jitter (``INPUT.COLOR_AUG_SSD``).

    The colour jitter comes last, not right after the resize as in the official list: it acts
    on each pixel alone, so the result is the same, and it then runs on the crop instead of on an
    image enlarged up to 2x per side.
    """
    height, width = fixed_image_size(cfg)
    augmentations: list[Any] = [
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE * scale_ratio,
            max_scale=cfg.INPUT.MAX_SCALE * scale_ratio,
            target_height=height,
            target_width=width,
        ),
        T.RandomCrop("absolute", (height, width)),
    ]
    augmentations += flip_augmentations(cfg)
    if cfg.INPUT.COLOR_AUG_SSD:
        augmentations.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    return augmentations


@dataclass
class _Canvas:
    """One augmented record on the zero-padded ``image_size`` canvas."""

    image: np.ndarray  # [H, W, C] uint8, 0 on padding
    segment_ids: np.ndarray  # [H, W] int64 panoptic segment ids, VOID_ID on void and padding
    is_real: np.ndarray  # [H, W] bool, False on padding
    segments: list[dict]  # the record's non-crowd segments_info entries


def _place_top_left(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array`` ([h, w, ...]) at the top-left of a zero array of spatial ``size``."""
    canvas = np.zeros(size + array.shape[2:], dtype=array.dtype)
    canvas[: array.shape[0], : array.shape[1]] = array
    return canvas


class KMaXPanopticDatasetMapper:
    """COCO-panoptic training record -> kMaX-DeepLab's training input (training only).

    Output, with (H, W) = ``image_size`` and (h, w) = (ceil(H / 4), ceil(W / 4)):

    - ``"image"``: [3, H, W] uint8 tensor, the augmented (and copy-pasted) image at the top left,
      zeros on the padding at the bottom / right;
    - ``"is_real_pixels"``: [H, W] bool tensor, False on padding (a pasted pixel is real);
    - ``"instances"``: :class:`Instances` of size (H, W) with ``gt_classes`` [M] int64 (contiguous
      ids) and ``gt_masks`` [M, h, w] bool, the targets on every 4th pixel: one mask per visible
      non-crowd thing segment and one per visible stuff class (M may be 0 only when no draw
      succeeded, see below);
    - ``"sem_seg_gt"``: [h, w] int64 tensor, the class of the mask covering each pixel, else
      ``ignore_label`` (void, crowd and padding);
    - the other fields of the record drawn (``file_name``, ``image_id``, ``height``, ``width``,
      ...), without its label fields (``pan_seg_file_name``, ``sem_seg_file_name``,
      ``segments_info``: they describe the image before augmentation and copy-paste).

    A draw is kept when it has at least one mask and more than ``labeled_pixels_threshold``
    labelled pixels on the stride-4 grid. Otherwise, as in the official mapper, another main
    record is drawn at random from ``partner_records`` (the same record again when there is no
    pool), with new augmentations and a new partner, up to ``max_draws`` draws in all; then the
    draw with the most labelled pixels is returned.

    Randomness comes from ``numpy.random`` (detectron2's augmentations) and Python's ``random``
    (colour jitter, partner choice, pasted stuff), which detectron2 seeds per data-loader worker.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[Any],
        partner_augmentations: list[Any],
        image_format: str,
        image_size: tuple[int, int],
        partner_records: Optional[Sequence[dict]],
        copy_paste: bool = True,
        thing_class_ids: Optional[Collection[int]] = None,
        ignore_label: int = 255,
        num_classes: Optional[int] = None,
        labeled_pixels_threshold: int = OFFICIAL_LABELED_PIXELS_THRESHOLD,
        max_draws: int = 10,
        decoded_file_cache_mb: float = 0.0,
    ):
        """
        Args:
            is_train: must be True: this mapper builds training targets; evaluation reads images
                with detectron2's ``DatasetMapper``.
            augmentations: detectron2 augmentations / transforms of the main image; their output
                must fit in ``image_size``.
            partner_augmentations: the same for the copy-paste partner.
            image_format: a format of :func:`detectron2.data.detection_utils.read_image`.
            image_size: (H, W) of the output canvas.
            partner_records: catalog records to draw copy-paste partners and re-drawn samples
                from (the training set); None: none (then ``copy_paste`` must be False).
            copy_paste: paste a partner's segments on every sample.
            thing_class_ids: contiguous ids of the thing classes, for segments without an
                ``"isthing"`` field (detectron2's Cityscapes records); None: every segment must
                have one.
            ignore_label: ``sem_seg_gt`` value of void, crowd and padded pixels.
            num_classes: categories must lie in ``[0, num_classes)``; None: no check.
            labeled_pixels_threshold: a draw needs more than this many labelled stride-4 pixels.
            max_draws: draws per call before giving up (>= 1).
            decoded_file_cache_mb: keep up to this many MiB of decoded images and panoptic PNGs
                in memory, per process (:class:`DecodedFileCache`): every sample reads two
                records; 0: read every time.
        """
        self._check_training(is_train)
        if copy_paste and not partner_records:
            raise ValueError("Copy-paste needs partner_records to draw partners from.")
        if max_draws < 1:
            raise ValueError(f"max_draws must be >= 1, got {max_draws}.")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.partner_augmentations = T.AugmentationList(partner_augmentations)
        self.image_format = image_format
        self.image_size = tuple(image_size)
        self.partner_records = partner_records
        self.copy_paste = copy_paste
        self.thing_class_ids = None if thing_class_ids is None else frozenset(thing_class_ids)
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.labeled_pixels_threshold = labeled_pixels_threshold
        self.max_draws = max_draws
        self.file_cache = DecodedFileCache.from_mib(decoded_file_cache_mb)
        logger.info(
            f"[{type(self).__name__}] Augmentations used in training: {augmentations}; copy-paste: "
            + (f"partners {partner_augmentations}" if copy_paste else "off")
        )

    @classmethod
    def _check_training(cls, is_train: bool) -> None:
        if not is_train:
            raise ValueError(
                f"{cls.__name__} builds training targets only; evaluation reads images with "
                f"detectron2's DatasetMapper."
            )

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        """Partners come from ``DatasetCatalog`` for every ``cfg.DATASETS.TRAIN`` set, and thing
        classes from their metadata's ``thing_dataset_id_to_contiguous_id``."""
        cls._check_training(is_train)
        height, width = fixed_image_size(cfg)
        if not cfg.DATASETS.TRAIN:
            raise ConfigError("DATASETS.TRAIN is empty: kmax_panoptic draws copy-paste partners from it.")
        records = []
        thing_class_ids: Optional[set[int]] = None
        for name in cfg.DATASETS.TRAIN:
            dataset = DatasetCatalog.get(name)
            if dataset and not {"pan_seg_file_name", "segments_info"} <= dataset[0].keys():
                raise DatasetError(
                    f"Dataset '{name}' of DATASETS.TRAIN has no COCO-panoptic annotations "
                    f"('pan_seg_file_name' / 'segments_info'): INPUT.DATASET_MAPPER_NAME="
                    f"'kmax_panoptic' trains on panoptic records. Use the dataset's panoptic "
                    f"registration (e.g. *_panoptic_train) or a mapper matching its annotations."
                )
            records.extend(dataset)
            id_map = MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id", None)
            if id_map is not None:
                thing_class_ids = (thing_class_ids or set()) | set(id_map.values())
        if not records:
            raise DatasetError(
                f"The datasets of DATASETS.TRAIN ({', '.join(cfg.DATASETS.TRAIN)}) have no records."
            )
        # The official threshold, 4% of COCO's 1281x1281 stride-4 grid, capped at a quarter of the
        # grid: the official value for every official recipe (641 px crops and larger), and
        # small crops (tests, memory-lean recipes) still pass.
        grid_pixels = -(-height // LABEL_STRIDE) * -(-width // LABEL_STRIDE)
        return {
            "is_train": is_train,
            "augmentations": kmax_augmentations(cfg),
            "partner_augmentations": kmax_augmentations(cfg, PARTNER_SCALE_RATIO),
            "image_format": cfg.INPUT.FORMAT,
            "image_size": (height, width),
            # Serialised, as detectron2's loaders hold datasets, so that data-loader workers share
            # the pool instead of copying it page by page as Python touches the records.
            "partner_records": DatasetFromList(records, copy=False, serialize=True),
            "copy_paste": True,
            "thing_class_ids": thing_class_ids,
            # The value the kMaX losses ignore; sem_seg_gt is made here, not read from a file,
            # so no dataset-specific ignore label applies.
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "labeled_pixels_threshold": min(OFFICIAL_LABELED_PIXELS_THRESHOLD, grid_pixels // 4),
            "decoded_file_cache_mb": cfg.DATALOADER.DECODED_FILE_CACHE_MB,
        }

    # -----------------------------------------------------------------------------------------
    # Reading one record
    # -----------------------------------------------------------------------------------------
    def _is_thing(self, segment: dict) -> bool:
        if "isthing" in segment:
            return bool(segment["isthing"])
        if self.thing_class_ids is None:
            raise DatasetError(
                f"Segment {segment['id']} has no 'isthing' field and the training sets' metadata "
                f"has no 'thing_dataset_id_to_contiguous_id': cannot tell things (always pasted, "
                f"one mask each) from stuff (merged per class)."
            )
        return segment["category_id"] in self.thing_class_ids

    def _read(self, record: dict, augmentations: T.AugmentationList) -> _Canvas:
        """Read, check and augment ``record`` (not modified) and place it on the canvas."""
        if "pan_seg_file_name" not in record or "segments_info" not in record:
            raise DatasetError(
                f"Record of {record['file_name']} has no 'pan_seg_file_name' / 'segments_info': "
                f"{type(self).__name__} trains on COCO-panoptic annotations. Use the dataset's "
                f"panoptic registration or INPUT.DATASET_MAPPER_NAME matching its annotations."
            )
        path = record["pan_seg_file_name"]
        segments_info = record["segments_info"]
        check_class_ids(
            [s["category_id"] for s in segments_info], self.num_classes, None, f"segments_info of {path}"
        )
        if any(s["id"] == VOID_ID for s in segments_info):
            raise DatasetError(
                f"segments_info of {path} lists a segment with id {VOID_ID}, the COCO-panoptic id "
                f"of void pixels: re-create the panoptic PNG and JSON."
            )
        image = read_image(record, self.image_format, self.file_cache)
        panoptic_rgb = read_panoptic_png(path, segments_info, self.file_cache)
        check_label_size(panoptic_rgb, path, image, record["file_name"])
        check_segment_areas(path, panoptic_rgb, segments_info)

        aug_input = T.AugInput(image)
        transforms = augmentations(aug_input)
        image = aug_input.image
        if image.shape[0] > self.image_size[0] or image.shape[1] > self.image_size[1]:
            raise ValueError(
                f"The augmentations made a {image.shape[1]}x{image.shape[0]} (WxH) image of "
                f"{record['file_name']}, larger than image_size {self.image_size[1]}x"
                f"{self.image_size[0]}: end them with a crop to image_size."
            )
        segment_ids = panoptic_ids(transforms.apply_segmentation(panoptic_rgb))
        return _Canvas(
            image=_place_top_left(image, self.image_size),
            segment_ids=_place_top_left(segment_ids, self.image_size),
            is_real=_place_top_left(np.ones(image.shape[:2], dtype=bool), self.image_size),
            segments=[s for s in segments_info if not s.get("iscrowd", 0)],
        )

    # -----------------------------------------------------------------------------------------
    # One sample
    # -----------------------------------------------------------------------------------------
    def _pasted_ids(self, segments: list[dict]) -> list[int]:
        """Ids of the partner segments to paste: every thing, and the first k of all segments in
        random order with k uniform in [0, len] (the official rule, so each stuff segment is
        pasted with probability 1/2 on average)."""
        ids = [s["id"] for s in segments]
        random.shuffle(ids)
        keep = random.randint(0, len(ids))
        things = {s["id"] for s in segments if self._is_thing(s)}
        return [i for n, i in enumerate(ids) if n < keep or i in things]

    def _draw(self, record: dict) -> tuple[dict, int]:
        """One augmented, copy-pasted sample of ``record``: the output fields and its number of
        labelled stride-4 pixels."""
        main = self._read(record, self.augmentations)
        image, is_real, segment_ids = main.image, main.is_real, main.segment_ids
        # (segments_info entry, id in segment_ids) of every candidate target.
        sources = [(s, s["id"]) for s in main.segments]
        if self.copy_paste:
            partner_record = self.partner_records[random.randrange(len(self.partner_records))]
            partner = self._read(partner_record, self.partner_augmentations)
            pasted = np.isin(partner.segment_ids, self._pasted_ids(partner.segments))
            image = np.where(pasted[..., None], partner.image, image)
            # Pasted pixels are labelled partner pixels, hence real.
            is_real = is_real | pasted
            # Negated partner ids cannot collide with the main image's (ids are > 0).
            segment_ids = np.where(pasted, -partner.segment_ids, segment_ids)
            sources += [(s, -s["id"]) for s in partner.segments]

        grid_ids = segment_ids[::LABEL_STRIDE, ::LABEL_STRIDE]
        classes: list[int] = []
        masks: list[np.ndarray] = []
        stuff_index: dict[int, int] = {}
        for segment, segment_id in sources:
            mask = grid_ids == segment_id
            if not mask.any():
                continue
            category = segment["category_id"]
            if self._is_thing(segment):
                classes.append(category)
                masks.append(mask)
            elif category in stuff_index:
                # Stuff is one target per class, whichever image (or segment) it comes from.
                masks[stuff_index[category]] |= mask
            else:
                stuff_index[category] = len(masks)
                classes.append(category)
                masks.append(mask)

        sem_seg = np.full(grid_ids.shape, self.ignore_label, dtype=np.int64)
        for category, mask in zip(classes, masks):
            sem_seg[mask] = category
        gt_masks = (
            torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros((0,) + grid_ids.shape, dtype=torch.bool)
        )
        fields = {
            "image": image_to_tensor(image),
            "is_real_pixels": torch.from_numpy(is_real),
            "instances": Instances(
                self.image_size, gt_classes=torch.tensor(classes, dtype=torch.int64), gt_masks=gt_masks
            ),
            "sem_seg_gt": torch.from_numpy(sem_seg),
        }
        return fields, int(sum(m.sum() for m in masks))

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: one COCO-panoptic record in detectron2's dataset format (not modified).

        Returns:
            the fields of the record drawn plus the model inputs listed in the class docstring.
        """
        record = dataset_dict
        best: Optional[tuple[dict, dict, int]] = None
        for draw in range(self.max_draws):
            if draw > 0 and self.partner_records:
                record = self.partner_records[random.randrange(len(self.partner_records))]
            fields, labeled = self._draw(record)
            if best is None or labeled > best[2]:
                best = (record, fields, labeled)
            if len(fields["instances"]) > 0 and labeled > self.labeled_pixels_threshold:
                break
            logger.debug(
                f"{record['file_name']}: draw {draw + 1}/{self.max_draws} rejected: "
                f"{len(fields['instances'])} masks and {labeled} labelled pixels (needs a mask and > "
                f"{self.labeled_pixels_threshold})."
            )
        else:
            log_every_n_seconds(
                logging.WARNING,
                f"No sample with masks and > {self.labeled_pixels_threshold} labelled pixels in "
                f"{self.max_draws} draws from {dataset_dict['file_name']}; using the best draw "
                f"({best[2]} labelled pixels).",
                n=60,
                name=__name__,
            )
        record, fields, _ = best
        output = copy.deepcopy(record)
        for key in ("pan_seg_file_name", "sem_seg_file_name", "segments_info"):
            output.pop(key, None)
        output.update(fields)
        return output


@MAPPER_REGISTRY.register()
def kmax_panoptic(cfg: CfgNode, is_train: bool = True) -> KMaXPanopticDatasetMapper:
    """KMaXPanopticDatasetMapper from ``cfg`` (kMaX-DeepLab's COCO / Cityscapes / ADE20K
    panoptic recipes). Training only: ``is_train=False`` raises, as for the other training
    mappers; kMaX evaluates with detectron2's ``DatasetMapper``."""
    return KMaXPanopticDatasetMapper(cfg, is_train)
