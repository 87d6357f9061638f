#!/usr/bin/env python3
"""Convert an official StructToken checkpoint (mmseg, RockeyCoss/StructToken's releases), an
mmseg-named ViT (the ImageNet-21k weights it starts from) or a timm / DeiT ViT into a file for
``MODEL.WEIGHTS``.

    python tools/convert_structtoken.py --config-file configs/ade20k/semantic-segmentation/structtoken/structtoken_vit_base_cse.yaml \\
        --input struct-token-cse_vit-b_ade20k.pth --output structtoken_vit_base_cse.pth
    python tools/convert_structtoken.py --config-file configs/ade20k/semantic-segmentation/structtoken/structtoken_vit_base_cse.yaml \\
        --input deit_base_patch16_224-b5f2ef4d.pth --output deit_base_512.pth

The config gives the model the weights are for: its patch grid (the position embedding is
resampled to it) and its layout. Every converted key must exist in that model with the same shape;
keys the file does not have (the head, for a ViT) are listed and keep their initialisation.
"""
import sys

from kmax_m2f.converted_weights import converter_main, vit_pos_grid
from kmax_m2f.systems.struct_token.checkpoint import convert_structtoken_checkpoint


def main(argv: list[str] | None = None) -> int:
    return converter_main(
        argv,
        tool="convert_structtoken.py",
        description=__doc__.split("\n\n")[0],
        input_help="official .pth (mmseg), or a timm / DeiT ViT (.pth, .safetensors)",
        convert=lambda checkpoint, cfg: convert_structtoken_checkpoint(
            checkpoint, vit_pos_grid(cfg), cfg.MODEL.VIT.INTERPOLATE_MODE, cfg.MODEL.VIT.FINAL_NORM
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
