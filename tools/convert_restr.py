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
import sys

from kmax_m2f.converted_weights import converter_main, vit_pos_grid
from kmax_m2f.systems.restr.checkpoint import convert_restr_checkpoint


def main(argv: list[str] | None = None) -> int:
    return converter_main(
        argv,
        tool="convert_restr.py",
        description=__doc__.split("\n\n")[0],
        input_help="timm ViT or official ReSTR checkpoint",
        convert=lambda checkpoint, cfg: convert_restr_checkpoint(
            checkpoint, vit_pos_grid(cfg), cfg.MODEL.VIT.FINAL_NORM, cfg.MODEL.VIT.INTERPOLATE_MODE
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
