#!/usr/bin/env python3
"""Export the ViT of a LOCA pre-training checkpoint into a file for ``MODEL.WEIGHTS`` of another
config (StructToken, ReSTR, ...).

    python tools/export_loca_backbone.py --config-file configs/synthetic/semantic-segmentation/structtoken_vit_synthetic.yaml \\
        --input output/loca/model_final.pth --output loca_vit.pth [--encoder teacher|student]

The config gives the model the weights are for: the ViT's place in it (``backbone.``, ReSTR's
``encoder_v.``), its patch grid (the position embedding is resampled to it) and whether it has a
final LayerNorm. Every exported key must exist in that model with the same shape; its other keys
(the segmentation head) are listed and keep their initialisation. ``--encoder``: the EMA teacher
(default) or the student.
"""
import argparse
import sys

from kmax_m2f.converted_weights import converter_main
from kmax_m2f.systems.loca.export import ENCODER_PREFIXES, export_backbone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--encoder", choices=sorted(ENCODER_PREFIXES), default="teacher")
    args, rest = parser.parse_known_args(argv)
    return converter_main(
        rest,
        tool="export_loca_backbone.py",
        description=__doc__.split("\n\n")[0] + " Also: --encoder {teacher,student} (default teacher).",
        input_help="LOCA checkpoint (model_final.pth of tools/train_net.py)",
        convert=lambda checkpoint, cfg: export_backbone(checkpoint, cfg, args.encoder),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
