#!/usr/bin/env python3
"""Run a model on images and draw its panoptic / instance / semantic results.

    python tools/demo.py --config-file CONFIG.yaml --input a.jpg b.png --output out/ \\
        --opts MODEL.WEIGHTS model.pth

With --show-clusters (kMaX-DeepLab models), ``<name>_clusters.png`` is written next to
``<name>.png``: the pixel-to-cluster assignment of every kMaX decoder stage, side by side.

Referring models (ReSTR) take the sentence with --text and draw the mask it refers to:

    python tools/demo.py --config-file configs/synthetic/referring-segmentation/restr_vit_synthetic.yaml \
        --input a.jpg --text "the red circle on the left" --output out/ --opts MODEL.WEIGHTS model.pth

Works on CPU and GPU (MODEL.DEVICE). Class names and colours come from the metadata of the first
test dataset (DATASETS.TEST), else the first training dataset.
"""
import argparse
import glob
import logging
import os
import sys
from unittest import mock

import kmax_m2f  # first: it silences a warning detectron2's imports would print
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.engine import defaults as detectron2_defaults
from detectron2.utils.logger import setup_logger
from PIL import Image
import torch

from kmax_m2f.config import ConfigError
from kmax_m2f.data.datasets.checks import DatasetError
from kmax_m2f.data.datasets.image_folder import list_images
from kmax_m2f.data.images import read_image
from kmax_m2f.engine import Checkpointer, CheckpointError
from kmax_m2f.evaluation import enabled_tasks
from kmax_m2f.modeling.meta_arch.common import REFER
from kmax_m2f.systems.restr import ReferringDatasetMapper
from kmax_m2f.visualization import draw_cluster_assignments, draw_predictions

logger = logging.getLogger("kmax_m2f.demo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders (their images, recursively) or quoted glob patterns")
    parser.add_argument("--output", required=True, help="folder for the drawings (created if needed)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="for instance results")
    parser.add_argument(
        "--show-clusters", action="store_true",
        help="kMaX-DeepLab: also draw each decoder stage's pixel-to-cluster assignment (<name>_clusters.png)",
    )
    parser.add_argument("--text", help="referring models (ReSTR): the sentence that names the object to segment")
    parser.add_argument(
        "--allow-random-weights", action="store_true",
        help="draw with an untrained model when MODEL.WEIGHTS is empty, instead of refusing",
    )
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def predict_referring(
    predictor: DefaultPredictor, mapper: ReferringDatasetMapper, image_bgr, sentence: str
) -> dict:
    """The referring model's output for one image and sentence (``mapper``, the test-time
    ``refer`` mapping, on the in-memory image), with the sentence kept for the drawing."""
    image = image_bgr[:, :, ::-1] if mapper.image_format == "RGB" else image_bgr
    try:
        inputs = mapper.map_image(image, sentence)
        with torch.no_grad():
            predictions = predictor.model([inputs])[0]
    except ValueError as e:
        sys.exit(f"demo.py: {e}")
    if predictions["num_unknown_words"]:
        logger.warning(
            "%d word(s) of %r are not in the model's vocabulary and are read as <unk>; the result may ignore them.",
            predictions["num_unknown_words"], sentence,
        )
    return {**predictions, "sentence": sentence}


def expand_inputs(inputs: list[str]) -> list[str]:
    """Image files from ``--input``: files as given, folders as their images (recursively), glob
    patterns (``*``, ``?``, ``[``) as their matches, in order; exits naming what matched nothing."""
    files = []
    for entry in inputs:
        entry = os.path.expanduser(entry)
        if os.path.isdir(entry):
            try:
                files += list_images(entry)
            except FileNotFoundError:
                sys.exit(f"demo.py: --input folder {entry!r} holds no .jpg / .jpeg / .png image.")
        elif os.path.isfile(entry):
            files.append(entry)
        elif glob.has_magic(entry):
            matches = sorted(path for path in glob.glob(entry, recursive=True) if os.path.isfile(path))
            if not matches:
                sys.exit(f"demo.py: --input pattern {entry!r} matches no file.")
            files += matches
        else:
            sys.exit(f"demo.py: --input {entry!r} is neither a file, a folder nor a glob pattern that matches files.")
    return files


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="kmax_m2f")
    args.input = expand_inputs(args.input)
    try:
        cfg = kmax_m2f.build_config(args.config_file, args.opts)
    except ConfigError as e:
        sys.exit(f"demo.py: {e}")
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        untrained = "MODEL.WEIGHTS is empty, so the drawings would come from an untrained model (random weights)"
        if not args.allow_random_weights:
            sys.exit(
                f"demo.py: {untrained}: add --opts MODEL.WEIGHTS path/to/model.pth, or --allow-random-weights "
                "to draw anyway."
            )
        logger.warning("%s.", untrained)
    datasets = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    metadata = MetadataCatalog.get(datasets[0] if datasets else "__unused")
    try:
        # DefaultPredictor loads MODEL.WEIGHTS with the checkpointer that names what is wrong with a file.
        with mock.patch.object(detectron2_defaults, "DetectionCheckpointer", Checkpointer):
            predictor = DefaultPredictor(cfg)
    except CheckpointError as e:
        sys.exit(f"demo.py: {e}")
    if args.show_clusters:
        if not hasattr(predictor.model, "return_cluster_assignments"):
            sys.exit(
                f"demo.py: --show-clusters needs a kMaX-DeepLab model (MODEL.META_ARCHITECTURE kMaXDeepLab), "
                f"not {cfg.MODEL.META_ARCHITECTURE}"
            )
        predictor.model.return_cluster_assignments = True
    referring = REFER in (enabled_tasks(cfg) or set())
    if referring != (args.text is not None):
        sys.exit(
            f"demo.py: {cfg.MODEL.META_ARCHITECTURE} is a referring model: give the sentence with --text \"...\""
            if referring else f"demo.py: --text is for referring models (ReSTR), not {cfg.MODEL.META_ARCHITECTURE}"
        )
    referring_mapper = ReferringDatasetMapper(cfg, is_train=False) if referring else None
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        sys.exit(f"demo.py: --output {args.output!r} cannot be created ({e.strerror}): give a folder path.")
    for path in args.input:
        try:
            # Grey, palette and RGBA files are converted to 3 channels here, 16-bit ones scaled to 8 bits.
            image_bgr = read_image(path, format="BGR")
        except DatasetError as e:
            sys.exit(f"demo.py: {e}")
        if image_bgr.size == 0:
            sys.exit(f"demo.py: {path} is an empty image")
        try:
            if referring:
                predictions = predict_referring(predictor, referring_mapper, image_bgr, args.text)
            else:
                predictions = predictor(image_bgr)
        except ConfigError as e:
            sys.exit(f"demo.py: {path}: {e}")
        drawing = draw_predictions(image_bgr[:, :, ::-1], predictions, metadata, args.confidence_threshold)
        stem = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0])
        Image.fromarray(drawing).save(stem + ".png")
        logger.info("%s -> %s.png (%s)", path, stem, ", ".join(sorted(predictions)))
        if args.show_clusters:
            clusters = draw_cluster_assignments(
                image_bgr[:, :, ::-1], predictions["cluster_assignments"], predictor.model.cluster_stage_labels()
            )
            Image.fromarray(clusters).save(stem + "_clusters.png")
            logger.info("%s -> %s_clusters.png", path, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
