#!/usr/bin/env python3
"""Convert a timm ViT (ReSTR's ImageNet start, e.g. timm's ``vit_base_patch16_384``) or a checkpoint
of the official ReSTR code into a file for ``MODEL.WEIGHTS`` of a ReSTR config.

    python tools/convert_restr.py --config-file configs/refer/restr_vit_base_refcoco_unc.yaml \\
        --input vit_base_patch16_384.pth --output restr_vit_base_imagenet.pth

The input is a PyTorch state dict (``.pth`` / ``.bin``, optionally under "model" / "state_dict")
or a ``.safetensors`` file. The position embedding is resampled to the config's patch grid
(30 x 30 at 480 px). Every converted key must exist in the config's model with the same shape;
model keys the file lacks (the language and fusion encoders, for a ViT) keep their initialisation.
"""
import argparse
import logging
import sys

import torch

import kmax_m2f
from kmax_m2f.config import ConfigError
from kmax_m2f.converted_weights import WeightsMismatch, save_converted
from kmax_m2f.systems.restr.checkpoint import convert_restr_checkpoint

logger = logging.getLogger("kmax_m2f.convert_restr")


def _load(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the ReSTR config the weights are for")
    parser.add_argument("--input", required=True, help="timm ViT or official ReSTR checkpoint")
    parser.add_argument("--output", required=True, help="converted .pth for MODEL.WEIGHTS")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = kmax_m2f.build_config(args.config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + args.opts)
    except ConfigError as e:
        sys.exit(f"convert_restr.py: {e}")
    try:
        checkpoint = _load(args.input)
    except Exception as e:  # torch / safetensors raise several types for unreadable files
        sys.exit(f"convert_restr.py: cannot read {args.input} as a checkpoint ({type(e).__name__}: {e})")
    vit = cfg.MODEL.VIT
    grid = (vit.IMG_SIZE[0] // vit.PATCH_SIZE, vit.IMG_SIZE[1] // vit.PATCH_SIZE)
    try:
        converted = convert_restr_checkpoint(checkpoint, grid, vit.FINAL_NORM, vit.INTERPOLATE_MODE)
        save_converted(converted, cfg, args.output, "kmax_m2f tools/convert_restr.py")
    except WeightsMismatch as e:
        sys.exit(f"convert_restr.py: {args.input} does not fit the model of {args.config_file}: {e}")
    except ValueError as e:
        sys.exit(f"convert_restr.py: {args.input}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
