"""LOCA's views of one image and the patch correspondences between them.

One reference view (a random crop, not flipped) and several query views (one large, a few small
"focal" ones; each flipped at random) are cut from the same image. Every query patch gets the
index of the reference patch that shows the same image content, or -1 where it falls outside the
reference: the reference's patch grid is painted over the full image as a per-pixel index map
(nearest, half-pixel centres), and each query samples that map at the centres of its own patches.

Randomness comes from a ``numpy.random.RandomState``: training passes numpy's global one (which
detectron2 seeds per data-loader worker), evaluation one seeded by the image so that held-out
views are the same at every evaluation.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

__all__ = [
    "CropBox",
    "ColorAugmentation",
    "augment_colors",
    "crop_and_resize",
    "query_positions",
    "reference_index_map",
    "sample_crop_box",
]

# Inception-style crops keep aspect ratios between 3:4 and 4:3 (torchvision's and TF's default).
_LOG_RATIO_RANGE = (np.log(3 / 4), np.log(4 / 3))
_CROP_TRIES = 10


@dataclass(frozen=True)
class CropBox:
    """A crop of an image, in pixels: rows ``top:top + height``, columns ``left:left + width``."""

    top: int
    left: int
    height: int
    width: int


def sample_crop_box(rng: np.random.RandomState, height: int, width: int, scale: tuple[float, float]) -> CropBox:
    """An Inception-style crop: a fraction ``scale`` of the image area (uniform) with an aspect
    ratio log-uniform in [3/4, 4/3]; after ten draws that do not fit, the largest central crop
    within those ratios (torchvision's RandomResizedCrop rule)."""
    area = height * width
    for _ in range(_CROP_TRIES):
        target_area = area * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(*_LOG_RATIO_RANGE))
        crop_w = int(round(np.sqrt(target_area * ratio)))
        crop_h = int(round(np.sqrt(target_area / ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return CropBox(rng.randint(0, height - crop_h + 1), rng.randint(0, width - crop_w + 1), crop_h, crop_w)
    in_ratio = width / height
    if in_ratio < 3 / 4:
        crop_w, crop_h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        crop_h, crop_w = height, int(round(height * (4 / 3)))
    else:
        crop_h, crop_w = height, width
    return CropBox((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)


def _patch_centres(start: int, length: int, grid: int) -> np.ndarray:
    """Pixel index (in the image) under the centre of each of ``grid`` cells spanning
    ``length`` pixels from ``start``: floor((i + 0.5) * length / grid), PyTorch's
    ``nearest-exact``."""
    return start + np.floor((np.arange(grid) + 0.5) * length / grid).astype(np.int64)


def reference_index_map(height: int, width: int, box: CropBox, grid: int) -> np.ndarray:
    """[height, width] int64: the raster index (row * grid + col) of the reference patch each
    image pixel falls in when ``box`` is resized to a grid x grid patch view, -1 outside it.

    The grid is stretched over the box with the same half-pixel convention as the queries use
    (pixel i of the box belongs to cell floor((i + 0.5) * grid / box side))."""
    index = np.full((height, width), -1, dtype=np.int64)
    rows = np.floor((np.arange(box.height) + 0.5) * grid / box.height).astype(np.int64)
    cols = np.floor((np.arange(box.width) + 0.5) * grid / box.width).astype(np.int64)
    index[box.top : box.top + box.height, box.left : box.left + box.width] = rows[:, None] * grid + cols[None, :]
    return index


def query_positions(index_map: np.ndarray, box: CropBox, grid: int, flip: bool) -> np.ndarray:
    """[grid * grid] int64: for each patch of a query cut at ``box`` (then flipped left-right
    when ``flip``) and resized to a grid x grid patch view, the reference patch under its centre
    (raster order of the query's own grid; -1 outside the reference)."""
    rows = _patch_centres(box.top, box.height, grid)
    cols = _patch_centres(box.left, box.width, grid)
    positions = index_map[rows[:, None], cols[None, :]]
    if flip:
        positions = positions[:, ::-1]
    return np.ascontiguousarray(positions).reshape(-1)


def crop_and_resize(image: torch.Tensor, box: CropBox, size: int, flip: bool) -> torch.Tensor:
    """[3, H, W] uint8 -> the ``box`` crop, flipped left-right when ``flip``, resized
    (bilinear, antialiased) to [3, size, size] float in [0, 1]."""
    crop = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
    if flip:
        crop = crop.flip(-1)
    crop = TF.resize(crop, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return crop.float() / 255.0


@dataclass(frozen=True)
class ColorAugmentation:
    """SimCLR's colour distortions as LOCA applies them (TF semantics, images in [0, 1])."""

    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    solarize_prob: float = 0.0


def augment_colors(view: torch.Tensor, augmentation: ColorAugmentation, rng: np.random.RandomState) -> torch.Tensor:
    """[3, h, w] float in [0, 1] -> the same, colour-distorted: with ``jitter_prob`` brightness
    (additive, TF's ``random_brightness``), contrast, saturation and hue in a random order, each
    clipped to [0, 1]; grey (kept as 3 channels) with ``grayscale_prob``; solarised (values >= 0.5
    inverted) with ``solarize_prob``."""
    if rng.rand() < augmentation.jitter_prob:
        for op in rng.permutation(4):
            if op == 0:
                view = view + rng.uniform(-augmentation.brightness, augmentation.brightness)
            elif op == 1:
                view = TF.adjust_contrast(view, rng.uniform(1 - augmentation.contrast, 1 + augmentation.contrast))
            elif op == 2:
                view = TF.adjust_saturation(view, rng.uniform(1 - augmentation.saturation, 1 + augmentation.saturation))
            else:
                view = TF.adjust_hue(view, rng.uniform(-augmentation.hue, augmentation.hue))
            view = view.clamp(0.0, 1.0)
    if rng.rand() < augmentation.grayscale_prob:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if rng.rand() < augmentation.solarize_prob:
        view = torch.where(view < 0.5, view, 1.0 - view)
    return view
