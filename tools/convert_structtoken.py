#!/usr/bin/env python3
"""Convert an official StructToken checkpoint (mmseg, RockeyCoss/StructToken's releases) or an
mmseg-named ViT (the ImageNet-21k weights it starts from) into a file for ``MODEL.WEIGHTS``.

    python tools/convert_structtoken.py --config-file configs/ade20k/semantic-segmentation/structtoken/structtoken_vit_base_cse.yaml \\
        --input struct-token-cse_vit-b_ade20k.pth --output structtoken_vit_base_cse.pth

The config gives the model the weights are for: its patch grid (the position embedding is
resampled to it) and its layout. Every converted key must exist in that model with the same shape;
keys the file does not have (the head, for a ViT) are listed and keep their initialisation.
"""
import argparse
import logging
import sys

import torch

import kmax_m2f
from kmax_m2f.config import ConfigError
from kmax_m2f.converted_weights import WeightsMismatch, save_converted
from kmax_m2f.systems.struct_token.checkpoint import convert_mmseg_state_dict

logger = logging.getLogger("kmax_m2f.convert_structtoken")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the StructToken config the weights are for")
    parser.add_argument("--input", required=True, help="official .pth (mmseg)")
    parser.add_argument("--output", required=True, help="converted .pth for MODEL.WEIGHTS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = kmax_m2f.build_config(args.config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    except ConfigError as e:
        sys.exit(f"convert_structtoken.py: {e}")
    try:
        checkpoint = torch.load(args.input, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        sys.exit(f"convert_structtoken.py: cannot read {args.input} as a PyTorch checkpoint ({e})")
    vit = cfg.MODEL.VIT
    grid = (vit.IMG_SIZE[0] // vit.PATCH_SIZE, vit.IMG_SIZE[1] // vit.PATCH_SIZE)
    try:
        converted = convert_mmseg_state_dict(checkpoint, grid, vit.INTERPOLATE_MODE, vit.FINAL_NORM)
    except ValueError as e:
        sys.exit(f"convert_structtoken.py: {args.input}: {e}")

    try:
        save_converted(converted, cfg, args.output, "kmax_m2f tools/convert_structtoken.py")
    except WeightsMismatch as e:
        sys.exit(f"convert_structtoken.py: {args.input} does not fit the model of {args.config_file}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
