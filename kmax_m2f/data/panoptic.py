"""Reading COCO-panoptic ground truth."""
import numpy as np
from detectron2.data import detection_utils as utils
from panopticapi.utils import rgb2id

from .datasets.checks import DatasetError

VOID_ID = 0


def read_panoptic_ids(pan_seg_file_name: str, segments_info: list[dict]) -> np.ndarray:
    """[H, W] int64 segment ids of a COCO-panoptic PNG (id = R + 256 G + 256^2 B, 0 = void),
    checked against the segments its JSON lists: an id the JSON does not describe means the PNG
    and the JSON come from different conversions."""
    segment_ids = rgb2id(utils.read_image(pan_seg_file_name, "RGB")).astype(np.int64)
    described = {segment["id"] for segment in segments_info}
    unknown = set(np.unique(segment_ids).tolist()) - described - {VOID_ID}
    if unknown:
        raise DatasetError(
            f"{pan_seg_file_name} contains segment ids {sorted(unknown)[:10]} that its JSON "
            f"segments_info does not list (it lists {sorted(described)[:10]}). The PNG and the JSON "
            f"do not belong together: regenerate both with the same prepare_*.py run."
        )
    return segment_ids
