"""Unlabelled image folders as detectron2 datasets, for self-supervised pre-training (LOCA).

A dataset name ``folder:PATH`` in ``DATASETS.TRAIN`` / ``DATASETS.TEST`` is registered by
:func:`kmax_m2f.build_config` as every .jpg / .jpeg / .png file under PATH (recursively, in sorted
order), records ``{"file_name", "image_id"}``. Files that cannot be decoded are reported and
skipped by the mapper that reads them.
"""
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["FOLDER_PREFIX", "IMAGE_EXTENSIONS", "list_images", "register_folder_datasets", "register_image_folder"]

logger = logging.getLogger(__name__)

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(root: str) -> list[str]:
    """Every image file (by extension, any case) under ``root``, recursively, sorted.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no image file.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist (dataset name '{FOLDER_PREFIX}{root}').")
    files = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders.sort()
        files += [os.path.join(folder, name) for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"Image folder {root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} file (searched recursively).")
    return files


def register_image_folder(name: str, root: str) -> None:
    """Register ``name`` as the images under ``root`` (listed when the dataset is loaded)."""

    def load() -> list[dict]:
        files = list_images(root)
        logger.info("Image folder %s: %d images.", root, len(files))
        return [{"file_name": file_name, "image_id": index} for index, file_name in enumerate(files)]

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(image_root=root, evaluator_type="image_folder")


def register_folder_datasets(names) -> None:
    """Register each ``folder:PATH`` name of ``names`` not registered yet."""
    for name in names:
        if name.startswith(FOLDER_PREFIX) and name not in DatasetCatalog:
            register_image_folder(name, os.path.expanduser(name[len(FOLDER_PREFIX):]))
