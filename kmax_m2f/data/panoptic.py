"""Reading COCO-panoptic ground truth."""
import numpy as np
from detectron2.data import detection_utils as utils
from panopticapi.utils import rgb2id

from .datasets.checks import DatasetError
from .file_cache import NO_CACHE, DecodedFileCache

VOID_ID = 0


def read_panoptic_png(
    pan_seg_file_name: str, segments_info: list[dict], cache: DecodedFileCache = NO_CACHE
) -> np.ndarray:
    """[H, W, 3] uint8 COCO-panoptic PNG (segment id = R + 256 G + 256^2 B, 0 = void), checked
    against the segments its JSON lists: an id the JSON does not describe means the PNG and the
    JSON come from different conversions. ``cache`` keeps the checked picture (read-only).

    Mappers augment this picture and decode the ids afterwards (:func:`panoptic_ids`): detectron2
    resizes a uint8 picture with PIL's nearest neighbour, so ids up to 2^24 survive exactly, and
    the ids never need encoding back into a picture."""
    return cache.get(
        ("panoptic", pan_seg_file_name), lambda: _read_checked_panoptic_png(pan_seg_file_name, segments_info)
    )


def _read_checked_panoptic_png(pan_seg_file_name: str, segments_info: list[dict]) -> np.ndarray:
    panoptic_rgb = utils.read_image(pan_seg_file_name, "RGB")
    described = [segment["id"] for segment in segments_info]
    segment_ids = rgb2id(panoptic_rgb)
    # isin compares against the few listed ids; np.unique would sort every pixel.
    if not np.isin(segment_ids, described + [VOID_ID]).all():
        unknown = sorted(set(np.unique(segment_ids).tolist()) - set(described) - {VOID_ID})
        raise DatasetError(
            f"{pan_seg_file_name} contains segment ids {unknown[:10]} that its JSON "
            f"segments_info does not list (it lists {sorted(described)[:10]}). The PNG and the JSON "
            f"do not belong together: regenerate both with the same prepare_*.py run."
        )
    return panoptic_rgb


# A listed area may differ from the PNG's pixel count by this fraction (plus one pixel) before
# the PNG is taken for another image's: the JSON areas are pixel counts of the same PNG.
AREA_TOLERANCE = 0.01


def check_segment_areas(pan_seg_file_name: str, panoptic_rgb: np.ndarray, segments_info: list[dict]) -> None:
    """Every segment the JSON lists with an ``area`` must cover about that many pixels of the
    [H, W, 3] picture (:func:`read_panoptic_png`, before any augmentation): a PNG of another
    image whose ids happen to be among the listed ones fails here. Mappers call it after checking
    the PNG's size against the image's, the plainer message for that case."""
    segment_ids = rgb2id(panoptic_rgb)
    listed = [s for s in segments_info if s.get("area", 0) > 0]
    if not listed:
        return
    known = np.array(sorted({s["id"] for s in segments_info} | {VOID_ID}))
    counts = np.bincount(np.searchsorted(known, segment_ids.ravel()), minlength=len(known))
    pixels = dict(zip(known.tolist(), counts.tolist()))
    for segment in listed:
        found, area = pixels.get(segment["id"], 0), segment["area"]
        if abs(found - area) > AREA_TOLERANCE * area + 1:
            raise DatasetError(
                f"{pan_seg_file_name}: segment {segment['id']} (category {segment.get('category_id')}) covers {found} "
                f"pixels, but its JSON segments_info gives area {area}. The PNG does not belong to this JSON entry "
                f"(another image's PNG, or a PNG from another conversion): regenerate both with the same prepare_*.py run."
            )


def panoptic_ids(panoptic_rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 COCO-panoptic picture (whole or augmented) -> [H, W] int64 segment ids."""
    return rgb2id(panoptic_rgb).astype(np.int64)


def read_panoptic_ids(pan_seg_file_name: str, segments_info: list[dict]) -> np.ndarray:
    """[H, W] int64 segment ids of a COCO-panoptic PNG, checked (:func:`read_panoptic_png`,
    :func:`check_segment_areas`)."""
    panoptic_rgb = read_panoptic_png(pan_seg_file_name, segments_info)
    check_segment_areas(pan_seg_file_name, panoptic_rgb, segments_info)
    return panoptic_ids(panoptic_rgb)
