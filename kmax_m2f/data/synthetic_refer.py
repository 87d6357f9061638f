"""The synthetic referring-segmentation set, derived deterministically from the synthetic panoptic
set (kmax_m2f.data.synthetic_generator): every segment that a short description picks out
uniquely becomes a referent, described by its colour, shape, size and position ("the small red
circle on the left", "the blue stripes").

Written in the refer layout under ``<synthetic root>/refer`` (datasets/README.md)::

    instances.json        every segment of both splits as a COCO annotation (RLE); image ids
                          unique across splits, file names relative to the synthetic root
    refs(synthetic).p     the referents with their sentences and split ("train" / "val")
"""
import colorsys
import json
import logging
import os
import pickle
from itertools import combinations

import numpy as np
import pycocotools.mask as mask_util
from panopticapi.utils import rgb2id
from PIL import Image

from .synthetic_generator import SYNTHETIC_CATEGORIES, THING_IDS

__all__ = ["colour_name", "describe_segments", "generate_synthetic_refer"]

logger = logging.getLogger(__name__)

SHAPE_NAMES = {c["id"]: c["name"] for c in SYNTHETIC_CATEGORIES if c["isthing"]}
# Stuff is unique per image (each texture fills one region), so its name alone refers to it.
STUFF_NAMES = {11: ("the green noise", "the grass"), 12: ("the blue stripes", "the water"),
               13: ("the checkerboard", "the wood")}
MIN_THING_FRACTION = 0.004  # smaller visible shapes are too small to be referred to
SPLIT_IMAGE_ID_OFFSET = {"train": 0, "val": 1_000_000}


def colour_name(rgb: np.ndarray) -> str:
    """A basic colour word for a mean [R, G, B] (0-255): grey levels by value when unsaturated,
    else one of eight hue ranges."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(np.asarray(rgb, np.float64) / 255.0))
    if value < 0.25:
        return "black"
    if saturation < 0.25:
        return "white" if value > 0.75 else "grey"
    degrees = hue * 360
    for limit, name in ((15, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"),
                        (260, "blue"), (300, "purple"), (340, "pink"), (361, "red")):
        if degrees < limit:
            return name
    return "red"


def _thing_attributes(masks: list[np.ndarray], shapes: list[int], image: np.ndarray) -> list[dict]:
    height, width = image.shape[:2]
    areas = [int(m.sum()) for m in masks]
    attributes = []
    for index, (mask, shape) in enumerate(zip(masks, shapes)):
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / width, ys.mean() / height
        horizontal = "on the left" if cx < 1 / 3 else "on the right" if cx > 2 / 3 else None
        vertical = "at the top" if cy < 1 / 3 else "at the bottom" if cy > 2 / 3 else None
        same_shape = [areas[j] for j in range(len(masks)) if shapes[j] == shape and j != index]
        size = None
        if same_shape and all(areas[index] * 1.5 <= a for a in same_shape):
            size = "small"
        elif same_shape and all(areas[index] >= 1.5 * a for a in same_shape):
            size = "large"
        attributes.append({
            "shape": SHAPE_NAMES[shape],
            "colour": colour_name(image[mask].mean(axis=0)),
            "size": size,
            "position": horizontal or vertical,
        })
    return attributes


def _phrase(attributes: dict, keys: tuple[str, ...]) -> str:
    words = ["the"] + [attributes[k] for k in ("size", "colour", "shape") if k in keys]
    if "position" in keys:
        words.append(attributes["position"])
    return " ".join(words)


def _unique_descriptions(index: int, attributes: list[dict]) -> list[str]:
    """The shortest and the longest attribute sets (always with the shape) that only thing
    ``index`` matches."""
    own = attributes[index]
    optional = [k for k in ("colour", "size", "position") if own[k] is not None]
    unique = []
    for count in range(len(optional) + 1):
        for chosen in combinations(optional, count):
            keys = ("shape",) + chosen
            if not any(all(other[k] == own[k] for k in keys)
                       for j, other in enumerate(attributes) if j != index):
                unique.append(keys)
    if not unique:
        return []
    phrases = [_phrase(own, unique[0]), _phrase(own, unique[-1])]
    return list(dict.fromkeys(phrases))


def describe_segments(image: np.ndarray, segments: list[tuple[int, np.ndarray]]) -> list[tuple[int, list[str]]]:
    """(segment index, sentences) for each segment of an image that can be referred to uniquely.

    Args:
        image: [H, W, 3] uint8 RGB.
        segments: (category id, [H, W] bool mask) of every segment.
    """
    things = [(i, c, m) for i, (c, m) in enumerate(segments)
              if c in THING_IDS and m.sum() >= MIN_THING_FRACTION * m.size]
    attributes = _thing_attributes([m for _, _, m in things], [c for _, c, _ in things], image)
    described = [(i, list(STUFF_NAMES[c])) for i, (c, _) in enumerate(segments) if c in STUFF_NAMES]
    for position, (index, _, _) in enumerate(things):
        sentences = _unique_descriptions(position, attributes)
        if sentences:
            described.append((index, sentences))
    return sorted(described)


def generate_synthetic_refer(root: str, splits: tuple[str, ...] = ("train", "val")) -> dict[str, list[str]]:
    """Write ``root/refer/{instances.json, refs(synthetic).p}`` from the panoptic set under
    ``root`` (see the module doc). Returns {split: its sentences}."""
    images, annotations, refs = [], [], []
    for split in splits:
        with open(os.path.join(root, "annotations", f"panoptic_{split}.json")) as f:
            panoptic = json.load(f)
        file_names = {image["id"]: image["file_name"] for image in panoptic["images"]}
        for entry in panoptic["annotations"]:
            image_id = entry["image_id"] + SPLIT_IMAGE_ID_OFFSET[split]
            file_name = f"{split}/{file_names[entry['image_id']]}"
            image = np.asarray(Image.open(os.path.join(root, file_name)).convert("RGB"))
            ids = rgb2id(np.asarray(Image.open(os.path.join(root, f"panoptic_{split}", entry["file_name"]))))
            segments = [(s["category_id"], ids == s["id"]) for s in entry["segments_info"]]
            images.append({"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
            first_annotation = len(annotations) + 1
            for category_id, mask in segments:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                    "segmentation": rle, "area": int(mask.sum()), "bbox": list(mask_util.toBbox(rle)), "iscrowd": 0,
                })
            for index, sentences in describe_segments(image, segments):
                ref_id = len(refs) + 1
                sentence_ids = [ref_id * 10 + k for k in range(len(sentences))]
                refs.append({
                    "ref_id": ref_id, "ann_id": first_annotation + index, "image_id": image_id, "split": split,
                    "category_id": segments[index][0], "file_name": file_name, "sent_ids": sentence_ids,
                    "sentences": [{"sent_id": sid, "sent": s, "raw": s, "tokens": s.split()}
                                  for sid, s in zip(sentence_ids, sentences)],
                })
    out = os.path.join(root, "refer")
    os.makedirs(out, exist_ok=True)
    categories = [{"id": c["id"], "name": c["name"], "supercategory": "shape"} for c in SYNTHETIC_CATEGORIES]
    with open(os.path.join(out, "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    with open(os.path.join(out, "refs(synthetic).p"), "wb") as f:
        pickle.dump(refs, f)
    sentences = {split: [s["sent"] for r in refs if r["split"] == split for s in r["sentences"]] for split in splits}
    logger.info("synthetic referring set: %d referents, sentences per split %s, in %s", len(refs),
                {split: len(v) for split, v in sentences.items()}, out)
    return sentences


