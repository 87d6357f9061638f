"""Referring-segmentation datasets in the standard "refer" layout (lichengunc/refer) and ReferIt,
registered in detectron2's catalog with ``evaluator_type="refer"``.

One record per (referent, sentence)::

    {"file_name", "height", "width", "image_id", "ref_id", "sentence", "sample_id",
     "segmentation": COCO polygons or RLE}      # RefCOCO / RefCOCO+ / RefCOCOg / synthetic
    {"file_name", "image_id", "ref_id", "sentence", "sample_id",
     "mask_file": ReferIt .mat}                 # ReferIt (no size: read from the image)

``referent_mask(record)`` decodes the target mask at the original resolution. Layouts under
$DETECTRON2_DATASETS are in datasets/README.md.
"""
import logging
import os
import pickle
from collections import defaultdict
from typing import Optional

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog

from .checks import DatasetError, datasets_root, load_json, require_file, require_listed_files

__all__ = [
    "REFER_SPLITS",
    "load_refer",
    "load_referit",
    "referent_mask",
    "register_refer",
    "register_referit",
]

logger = logging.getLogger(__name__)

# (dataset folder, split_by) -> splits, as the refer API publishes them.
REFER_SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "google"): ("train", "val"),
    ("refcocog", "umd"): ("train", "val", "test"),
}
REFERIT_SPLITS = ("train", "val", "trainval", "test")
REFER_HINT = "See datasets/README.md ('Referring segmentation') for where the refer files go."


def _load_refs(path: str, dataset_name: str) -> list[dict]:
    require_file(path, dataset_name, REFER_HINT)
    try:
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:
                # Python 2 pickles (the published files) with non-ASCII sentences.
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise DatasetError(
            f"Dataset '{dataset_name}': {path!r} is not a readable refs pickle ({e}); download it again."
        ) from e


def load_refer(refs_file: str, instances_file: str, image_root: str, split: str, dataset_name: str) -> list[dict]:
    """Records of ``split`` from a refs pickle and its ``instances.json`` (see module doc).
    Image paths are ``image_root`` / the instances' ``file_name``."""
    refs = _load_refs(refs_file, dataset_name)
    instances = load_json(instances_file, dataset_name)
    images = {image["id"]: image for image in instances["images"]}
    annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    refs = [ref for ref in refs if ref["split"] == split]
    if not refs:
        found = sorted({ref["split"] for ref in _load_refs(refs_file, dataset_name)})
        raise DatasetError(f"Dataset '{dataset_name}': {refs_file!r} has no referent in split {split!r} (it has {found}).")
    unknown = [ref["ref_id"] for ref in refs if ref["ann_id"] not in annotations or ref["image_id"] not in images]
    if unknown:
        raise DatasetError(
            f"Dataset '{dataset_name}': {len(unknown)} referent(s) of {refs_file!r} point at annotation or image "
            f"ids that {instances_file!r} does not have (ref_ids {unknown[:5]}...). The two files come from "
            "different releases: download the dataset's refs and instances.json together."
        )
    records = []
    for ref in refs:
        image = images[ref["image_id"]]
        for sentence in ref["sentences"]:
            records.append({
                "file_name": os.path.join(image_root, image["file_name"]),
                "height": image["height"],
                "width": image["width"],
                "image_id": ref["image_id"],
                "ref_id": ref["ref_id"],
                "sample_id": f"{ref['ref_id']}_{sentence['sent_id']}",
                "sentence": sentence["sent"],
                "segmentation": annotations[ref["ann_id"]]["segmentation"],
            })
    require_listed_files(sorted({r["file_name"] for r in records}), dataset_name, instances_file, REFER_HINT)
    logger.info("Loaded %d sentences of %d referents from %s (%s).", len(records), len(refs), refs_file, split)
    return records


def load_referit(root: str, split: str, dataset_name: str) -> list[dict]:
    """ReferIt records of ``split`` from ``referit_query_<split>.json`` ({"<image>_<ann>":
    [sentences]}), ``images/<image>.jpg`` and ``mask/<image>_<ann>.mat``."""
    queries = load_json(os.path.join(root, f"referit_query_{split}.json"), dataset_name)
    records = []
    for ref_index, (name, sentences) in enumerate(sorted(queries.items())):
        image_name = name.split("_", 1)[0]
        for sent_index, sentence in enumerate(sentences):
            records.append({
                "file_name": os.path.join(root, "images", image_name + ".jpg"),
                "image_id": image_name,
                "ref_id": name,
                "sample_id": f"{name}_{sent_index}",
                "sentence": sentence,
                "mask_file": os.path.join(root, "mask", name + ".mat"),
            })
    require_listed_files(sorted({r["file_name"] for r in records}), dataset_name, os.path.join(root, "images"))
    return records


def referent_mask(record: dict, height: Optional[int] = None, width: Optional[int] = None) -> np.ndarray:
    """[H, W] bool target mask of a record, at the original image resolution."""
    if "mask_file" in record:
        from scipy.io import loadmat

        # ReferIt's masks: the referent is where segimg_t == 0.
        return loadmat(record["mask_file"])["segimg_t"] == 0
    height = record["height"] if height is None else height
    width = record["width"] if width is None else width
    segmentation = record["segmentation"]
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), bool)
        rles = mask_util.frPyObjects(polygons, height, width)
        return mask_util.decode(mask_util.merge(rles)).astype(bool)
    if isinstance(segmentation.get("counts"), list):
        segmentation = mask_util.frPyObjects(segmentation, height, width)
    return mask_util.decode(segmentation).astype(bool)


def _set_metadata(name: str, **extra) -> None:
    MetadataCatalog.get(name).set(evaluator_type="refer", **extra)


def register_refer(
    name: str, refs_file: str, instances_file: str, image_root: str, split: str
) -> None:
    """Register one split of a refer-format dataset as ``name``."""
    DatasetCatalog.register(
        name, lambda: load_refer(refs_file, instances_file, image_root, split, name)
    )
    _set_metadata(name, refs_file=refs_file, json_file=instances_file, image_root=image_root, split=split)


def register_referit(name: str, root: str, split: str) -> None:
    DatasetCatalog.register(name, lambda: load_referit(root, split, name))
    _set_metadata(name, image_root=os.path.join(root, "images"), split=split)


def _register_all(root: str) -> None:
    coco_images = os.path.join(root, "coco", "train2014")
    for (dataset, split_by), splits in REFER_SPLITS.items():
        folder = os.path.join(root, "refer", dataset)
        for split in splits:
            register_refer(
                f"{dataset}_{split_by}_{split}",
                os.path.join(folder, f"refs({split_by}).p"),
                os.path.join(folder, "instances.json"),
                coco_images,
                split,
            )
    for split in REFERIT_SPLITS:
        register_referit(f"referit_{split}", os.path.join(root, "referit"), split)
    synthetic = os.path.join(root, "synthetic")
    for split in ("train", "val"):
        register_refer(
            f"synthetic_refer_{split}",
            os.path.join(synthetic, "refer", "refs(synthetic).p"),
            os.path.join(synthetic, "refer", "instances.json"),
            synthetic,
            split,
        )


def image_segments(instances_file: str) -> dict:
    """{image_id: [annotation segmentation, ...]} of an instances.json (for baselines)."""
    instances = load_json(instances_file, instances_file)
    segments = defaultdict(list)
    for annotation in instances["annotations"]:
        segments[annotation["image_id"]].append(annotation["segmentation"])
    return segments


_register_all(datasets_root())
