#!/usr/bin/env python3
"""Write the word vocabulary of ReSTR's GloVe language encoder from registered training sets.

    python datasets/prepare_refer_vocab.py --dataset refcoco_unc_train refcoco+_unc_train \\
        refcocog_google_train --output datasets/refer/vocabulary_refcoco.txt
    python datasets/prepare_refer_vocab.py --dataset referit_trainval --output datasets/referit/vocabulary.txt

One word per line: <pad> (id 0), <unk>, then every word of the sentences (split as the tokenizer
splits them) seen at least --min-count times, most frequent first. Point
MODEL.RESTR.LANGUAGE.VOCABULARY at the file.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from detectron2.data import DatasetCatalog  # noqa: E402

import kmax_m2f  # noqa: E402,F401  (registers the datasets)
from kmax_m2f.systems.restr.text import build_vocabulary, write_vocabulary  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", required=True, help="registered referring datasets (training splits)")
    parser.add_argument("--output", required=True, help="vocabulary file to write")
    parser.add_argument("--min-count", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sentences = [record["sentence"] for name in args.dataset for record in DatasetCatalog.get(name)]
    words = build_vocabulary(sentences, args.min_count)
    write_vocabulary(words, args.output)
    logging.info("%d words (with <pad> and <unk>) from %d sentences -> %s", len(words), len(sentences), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
