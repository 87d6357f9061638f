#!/usr/bin/env python3
"""Write the synthetic panoptic dataset to $DETECTRON2_DATASETS/synthetic (default ./datasets),
and the referring set derived from it (synthetic/refer, with its vocabulary).

    python datasets/prepare_synthetic.py                 # 400 train / 50 val images, 256x256
    python datasets/prepare_synthetic.py --num-train 40 --num-val 8 --size 128 --seed 1
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from kmax_m2f.data.datasets.checks import datasets_root  # noqa: E402
from kmax_m2f.data.synthetic_generator import generate_synthetic_panoptic  # noqa: E402
from kmax_m2f.data.synthetic_refer import generate_synthetic_refer  # noqa: E402
from kmax_m2f.systems.restr.text import build_vocabulary, write_vocabulary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.join(datasets_root(), "synthetic"), help="output folder")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate_synthetic_panoptic(args.root, args.num_train, args.num_val, args.size, args.seed)
    sentences = generate_synthetic_refer(args.root)
    write_vocabulary(build_vocabulary(sentences["train"]), os.path.join(args.root, "refer", "vocabulary.txt"))


if __name__ == "__main__":
    main()
