#!/usr/bin/env python3
"""LOCA's transfer test: pre-train a ViT with LOCA, then fine-tune the same segmentation config
from those weights and from scratch, with the same budget and seed, and print both results.

    python tools/loca_transfer.py --output-dir output/loca_transfer [--seed 0]

Steps (each a public command, run in turn):
1. ``tools/train_net.py --config-file PRETRAIN_CONFIG`` (skipped when OUTPUT_DIR/pretrain has a
   model_final.pth: delete it to pre-train again);
2. ``tools/export_loca_backbone.py`` for FINETUNE_CONFIG;
3. ``tools/train_net.py --config-file FINETUNE_CONFIG MODEL.WEIGHTS <exported>``;
4. the same from scratch.
Both fine-tunings get ``MODEL.VIT.FINAL_NORM True`` (the ViT LOCA trains ends in a LayerNorm),
``SEED`` and ``--finetune-opts`` (e.g. the pre-trained ViT's size, for a config built around
another). The figures go to OUTPUT_DIR/results.json; the summary prints mIoU (semantic
segmentation) or oIoU (referring segmentation).
"""
import argparse
import json
import logging
import os
import subprocess
import sys

logger = logging.getLogger("loca_transfer")

TOOLS = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PRETRAIN = "configs/synthetic/pretraining/loca_vit_synthetic.yaml"
DEFAULT_FINETUNE = "configs/synthetic/semantic-segmentation/structtoken_vit_synthetic.yaml"


def run(command: list[str]) -> None:
    logger.info("$ %s", " ".join(command))
    subprocess.run(command, check=True)


def final_metrics(output_dir: str) -> dict:
    """The last entry of OUTPUT_DIR/metrics.json that holds evaluation results."""
    last = {}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            entry = json.loads(line)
            if any("/" in key and key.split("/")[0] in ("sem_seg", "localization", "refer") for key in entry):
                last = entry
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/loca_transfer")
    parser.add_argument("--pretrain-config", default=DEFAULT_PRETRAIN)
    parser.add_argument("--finetune-config", default=DEFAULT_FINETUNE)
    parser.add_argument("--seed", type=int, default=0, help="SEED of the pre-training and of both fine-tunings")
    parser.add_argument("--pretrain-opts", nargs="*", default=[], help="KEY VALUE overrides of the pre-training config")
    parser.add_argument("--finetune-opts", nargs="*", default=[],
                        help="KEY VALUE overrides of both fine-tunings (and of the export's target config)")
    parser.add_argument("--encoder", choices=("teacher", "student"), default="teacher", help="which LOCA encoder to export")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    python = sys.executable
    out = args.output_dir
    pretrain_dir = os.path.join(out, "pretrain")
    weights = os.path.join(out, f"loca_vit_{args.encoder}.pth")
    finetune = ["MODEL.VIT.FINAL_NORM", "True", "SEED", str(args.seed)] + args.finetune_opts
    if os.path.isfile(os.path.join(pretrain_dir, "model_final.pth")):
        logger.info("%s/model_final.pth exists: pre-training skipped.", pretrain_dir)
    else:
        run([python, os.path.join(TOOLS, "train_net.py"), "--config-file", args.pretrain_config,
             "OUTPUT_DIR", pretrain_dir, "SEED", str(args.seed)] + args.pretrain_opts)
    run([python, os.path.join(TOOLS, "export_loca_backbone.py"), "--encoder", args.encoder,
         "--config-file", args.finetune_config, "--input", os.path.join(pretrain_dir, "model_final.pth"),
         "--output", weights, "--opts"] + finetune)
    runs = {"loca": ["MODEL.WEIGHTS", weights], "scratch": ["MODEL.WEIGHTS", ""]}
    for name, weights_opts in runs.items():
        run([python, os.path.join(TOOLS, "train_net.py"), "--config-file", args.finetune_config,
             "OUTPUT_DIR", os.path.join(out, f"finetune_{name}")] + weights_opts + finetune)
    results = {
        "seed": args.seed,
        "pretrain": final_metrics(pretrain_dir),
        **{f"finetune_{name}": final_metrics(os.path.join(out, f"finetune_{name}")) for name in runs},
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    top1 = results["pretrain"].get("localization/top1")
    logger.info("LOCA pre-training: held-out localisation top-1 %s %%", f"{top1:.1f}" if top1 is not None else "n/a")
    for name in runs:
        metrics = results[f"finetune_{name}"]
        key = "refer/oIoU" if "refer/oIoU" in metrics else "sem_seg/mIoU"
        logger.info("Fine-tuned from %-7s: %s %.1f", name, key.split("/")[1], metrics.get(key, float("nan")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
