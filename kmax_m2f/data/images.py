"""Reading input images: detectron2's reader, with images of more than 8 bits per value scaled
to 8 bits first (converting them to RGB as detectron2 does would clip every value above 255, and
a 16-bit picture would come out white)."""
import os

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image, UnidentifiedImageError

from .datasets.checks import DatasetError

__all__ = ["UnreadableImageError", "read_image", "to_8_bit"]

# PIL modes whose values may exceed 255: 16-bit grey (byte orders), 32-bit integer, float.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class UnreadableImageError(DatasetError):
    """An image file that is missing, empty, truncated, not an image, or has no pixels."""


def to_8_bit(image: Image.Image) -> Image.Image:
    """A grey image of a wide mode as 8-bit grey ("L"): 16-bit files scaled by 255 / 65535; 32-bit
    integer and float ones by the smallest of 255, 65535 and their own maximum that covers their
    values (a float image in [0, 1] by 255). Other modes are returned as they are."""
    if image.mode not in _WIDE_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    elif image.mode == "F" and peak <= 1.0:
        full_scale = 1.0
    else:
        full_scale = next(scale for scale in (255.0, 65535.0, max(peak, 1.0)) if peak <= scale)
    scaled = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def read_image(file_name: str, format: str = None) -> np.ndarray:
    """:func:`detectron2.data.detection_utils.read_image` (EXIF orientation, conversion to
    ``format``), except that 16-bit, 32-bit and float grey images are first scaled to 8 bits by
    :func:`to_8_bit`. Returns an [H, W, C] uint8 array for "RGB" / "BGR" / "L".

    Raises :class:`UnreadableImageError` naming the file when it cannot be read or has no pixels.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = utils._apply_exif_orientation(Image.open(f))
            array = utils.convert_PIL_to_numpy(to_8_bit(image), format)
    except (UnidentifiedImageError, SyntaxError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            problem = "does not exist"
        elif os.path.isfile(file_name) and os.path.getsize(file_name) == 0:
            problem = "is empty (0 bytes)"
        else:
            problem = f"cannot be decoded as an image ({e}): it is truncated, corrupt or not an image"
        raise UnreadableImageError(
            f"Image {file_name} {problem}. Replace it, or remove it and its annotations "
            "(or set DATALOADER.SKIP_UNREADABLE_IMAGES True to skip such images in training)."
        ) from e
    if array.size == 0:
        raise UnreadableImageError(f"Image {file_name} has no pixels (shape {array.shape}). Replace or remove it.")
    return array
