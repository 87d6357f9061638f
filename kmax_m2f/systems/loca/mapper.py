"""The ``loca`` dataset mapper: any record with a ``file_name`` (a catalog dataset's or an image
folder's) -> LOCA's reference view, large query and focal queries with their correspondences."""
import os
import zlib

import numpy as np
import torch
from detectron2.config import CfgNode, configurable

from ...data.images import read_image
from ...data.mappers.build import MAPPER_REGISTRY
from .views import (
    ColorAugmentation,
    augment_colors,
    crop_and_resize,
    query_positions,
    reference_index_map,
    sample_crop_box,
)

__all__ = ["LocaViewMapper", "loca"]


def _to_uint8(view: torch.Tensor) -> torch.Tensor:
    """[3, h, w] float in [0, 1] -> uint8 in [0, 255] (a quarter of the memory in the loader)."""
    return (view * 255.0).round_().to(torch.uint8)


class LocaViewMapper:
    """Cuts one reference view and ``1 + num_focal_queries`` query views from an image.

    Returns its ``file_name``, ``image_id``, ``height`` and ``width`` and::

        reference         [3, R, R] uint8   reference view (colour-jittered, not flipped)
        query             [3, Q, Q] uint8   the large query
        query_positions   [(Q / p)^2] int64 reference patch under each large-query patch, or -1
        query_keep        [query_tokens_kept] int64  large-query patches the student encodes
        focal_queries     [F, 3, S, S] uint8 the focal queries
        focal_positions   [F, (S / p)^2] int64
        reference_keep_start  int: first of the contiguous reference tokens the position head sees

    A file that cannot be read raises :class:`~kmax_m2f.data.images.UnreadableImageError`; the
    LOCA configs set ``DATALOADER.SKIP_UNREADABLE_IMAGES`` so that training skips such files
    with a counted warning (web-crawled folders often hold a few). Training draws from numpy's
    global generator; evaluation from one seeded by the record's ``image_id`` and the file's base
    name (not its full path), so the held-out views are the same at every evaluation and wherever
    the dataset root lies.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        image_format: str,
        patch_size: int,
        reference_size: int,
        reference_scale: tuple[float, float],
        query_size: int,
        query_scale: tuple[float, float],
        num_focal_queries: int,
        focal_size: int,
        focal_scale: tuple[float, float],
        query_tokens_kept: int,
        reference_tokens_kept: int,
        reference_colors: ColorAugmentation,
        query_colors: ColorAugmentation,
        large_query_colors: ColorAugmentation,
    ) -> None:
        for name, size in (("reference", reference_size), ("query", query_size), ("focal", focal_size)):
            if size % patch_size:
                raise ValueError(f"The {name} view size {size} must be a multiple of the patch size {patch_size}.")
        self.is_train = is_train
        self.image_format = image_format
        self.reference_size = reference_size
        self.reference_scale = tuple(reference_scale)
        self.query_size = query_size
        self.query_scale = tuple(query_scale)
        self.num_focal_queries = num_focal_queries
        self.focal_size = focal_size
        self.focal_scale = tuple(focal_scale)
        self.reference_grid = reference_size // patch_size
        self.query_grid = query_size // patch_size
        self.focal_grid = focal_size // patch_size
        num_reference = self.reference_grid**2
        num_query = self.query_grid**2
        if not 0 < reference_tokens_kept <= num_reference:
            raise ValueError(f"reference_tokens_kept must be in [1, {num_reference}], got {reference_tokens_kept}")
        self.query_tokens_kept = num_query if query_tokens_kept <= 0 else min(query_tokens_kept, num_query)
        self.reference_tokens_kept = reference_tokens_kept
        self.reference_colors = reference_colors
        self.query_colors = query_colors
        self.large_query_colors = large_query_colors

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict:
        views = cfg.INPUT.LOCA
        colors = dict(
            jitter_prob=views.COLOR_JITTER_PROB,
            brightness=views.BRIGHTNESS,
            contrast=views.CONTRAST,
            saturation=views.SATURATION,
            hue=views.HUE,
            grayscale_prob=views.GRAYSCALE_PROB,
        )
        num_reference = (views.REFERENCE_SIZE // cfg.MODEL.VIT.PATCH_SIZE) ** 2
        return {
            "is_train": is_train,
            "image_format": cfg.INPUT.FORMAT,
            "patch_size": cfg.MODEL.VIT.PATCH_SIZE,
            "reference_size": views.REFERENCE_SIZE,
            "reference_scale": views.REFERENCE_SCALE,
            "query_size": views.QUERY_SIZE,
            "query_scale": views.QUERY_SCALE,
            "num_focal_queries": views.NUM_FOCAL_QUERIES,
            "focal_size": views.FOCAL_SIZE,
            "focal_scale": views.FOCAL_SCALE,
            "query_tokens_kept": views.QUERY_TOKENS_KEPT,
            "reference_tokens_kept": max(1, int(cfg.MODEL.LOCA.REFERENCE_KEEP_RATIO * num_reference)),
            "reference_colors": ColorAugmentation(**colors),
            "query_colors": ColorAugmentation(**colors),
            "large_query_colors": ColorAugmentation(**colors, solarize_prob=views.SOLARIZE_PROB),
        }

    def _random_state(self, dataset_dict: dict) -> np.random.RandomState:
        if self.is_train:
            return np.random.mtrand._rand
        image_id = dataset_dict.get("image_id", "")
        key = f"{image_id}:{os.path.basename(str(dataset_dict['file_name']))}"
        return np.random.RandomState(zlib.crc32(key.encode()))

    def _read(self, file_name: str) -> torch.Tensor:
        image = read_image(file_name, format=self.image_format)
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def __call__(self, dataset_dict: dict) -> dict:
        image = self._read(dataset_dict["file_name"])
        rng = self._random_state(dataset_dict)
        height, width = image.shape[-2:]

        reference_box = sample_crop_box(rng, height, width, self.reference_scale)
        index_map = reference_index_map(height, width, reference_box, self.reference_grid)
        reference = crop_and_resize(image, reference_box, self.reference_size, flip=False)
        reference = augment_colors(reference, self.reference_colors, rng)

        def query_view(size: int, grid: int, scale, colors: ColorAugmentation):
            box = sample_crop_box(rng, height, width, scale)
            flip = bool(rng.rand() < 0.5)
            view = augment_colors(crop_and_resize(image, box, size, flip), colors, rng)
            return _to_uint8(view), torch.from_numpy(query_positions(index_map, box, grid, flip))

        query, positions = query_view(self.query_size, self.query_grid, self.query_scale, self.large_query_colors)
        focal = [
            query_view(self.focal_size, self.focal_grid, self.focal_scale, self.query_colors)
            for _ in range(self.num_focal_queries)
        ]
        if focal:
            focal_queries = torch.stack([view for view, _ in focal])
            focal_positions = torch.stack([patch_positions for _, patch_positions in focal])
        else:
            focal_queries = torch.zeros(0, 3, self.focal_size, self.focal_size, dtype=torch.uint8)
            focal_positions = torch.zeros(0, self.focal_grid**2, dtype=torch.int64)
        query_keep = rng.permutation(self.query_grid**2)[: self.query_tokens_kept].astype(np.int64)
        num_reference = self.reference_grid**2
        return {
            "file_name": dataset_dict["file_name"],
            "image_id": dataset_dict.get("image_id", dataset_dict["file_name"]),
            "height": height,
            "width": width,
            "reference": _to_uint8(reference),
            "query": query,
            "query_positions": positions,
            "query_keep": torch.from_numpy(query_keep),
            "focal_queries": focal_queries,
            "focal_positions": focal_positions,
            "reference_keep_start": int(rng.randint(0, num_reference - self.reference_tokens_kept + 1)),
        }


@MAPPER_REGISTRY.register()
def loca(cfg: CfgNode, is_train: bool = True) -> LocaViewMapper:
    """LOCA's views (:class:`LocaViewMapper`), for training and for the held-out localisation
    accuracy."""
    return LocaViewMapper(cfg, is_train)


loca.maps_test_data = True
