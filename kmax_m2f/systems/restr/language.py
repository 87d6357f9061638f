"""ReSTR's language encoders: sentences -> word features [B, T, C] in the fusion width.

Chosen by ``MODEL.RESTR.LANGUAGE.NAME`` from ``RESTR_LANGUAGE_ENCODER_REGISTRY``:

- ``GloveTransformerEncoder``: the official one. Word embeddings (initialised from GloVe vectors
  when given, trainable, <pad> row zero) + sinusoidal positions, post-norm transformer blocks,
  ``proj_lang`` to the fusion width and ``lang_norm``.
- ``HuggingFaceEncoder``: a local BERT-style model folder (and its tokenizer) loaded offline with
  transformers, then the same ``proj_lang`` / ``lang_norm``.

Each encoder owns its tokenizer, so a model input needs only the raw sentence.
"""
import logging
import math

import torch
from detectron2.config import CfgNode, configurable
from detectron2.utils.registry import Registry
from torch import nn

from .layers import PostNormBlock, init_restr_weights
from .text import TokenizedSentences, WordTokenizer, load_vocabulary, load_word_vectors, resolve_asset

__all__ = [
    "RESTR_LANGUAGE_ENCODER_REGISTRY",
    "GloveTransformerEncoder",
    "HuggingFaceEncoder",
    "build_language_encoder",
    "sinusoidal_positions",
]

logger = logging.getLogger(__name__)

RESTR_LANGUAGE_ENCODER_REGISTRY = Registry("RESTR_LANGUAGE_ENCODER")
RESTR_LANGUAGE_ENCODER_REGISTRY.__doc__ = """
ReSTR language encoders, built as ``cls(cfg, out_dim)``. ``forward(sentences, device)`` returns
(features [B, T, out_dim], padding mask [B, T] bool, per-sentence number of unknown words).
"""


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """[length, dim] sine (even channels) / cosine (odd channels) position encodings."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {dim}")
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def _log_unknown(tokenized: TokenizedSentences, sentences: list[str]) -> None:
    for sentence, unknown in zip(sentences, tokenized.num_unknown):
        if unknown:
            logger.debug("%d unknown word(s) in %r, encoded as <unk>", unknown, sentence)


@RESTR_LANGUAGE_ENCODER_REGISTRY.register()
class GloveTransformerEncoder(nn.Module):
    """Word embeddings + sinusoidal positions -> post-norm transformer -> Linear -> LayerNorm."""

    @configurable
    def __init__(
        self,
        *,
        vocabulary: dict[str, int],
        out_dim: int,
        word_vectors: str = "",
        embed_dim: int = 300,
        num_layers: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        max_tokens: int = 20,
    ) -> None:
        """
        Args:
            vocabulary: {word: id}, <pad> = 0 (see ``text.load_vocabulary``).
            out_dim: the fusion width the features are projected to.
            word_vectors: pretrained vectors to start the embeddings from ('' = random); their
                width replaces ``embed_dim``.
            embed_dim, num_layers, num_heads, mlp_ratio: the word transformer's sizes.
            dropout, drop_path_rate: in the word transformer (drop path linear over the blocks).
            max_tokens: sentences are cut / padded to this many tokens.
        """
        super().__init__()
        self.tokenizer = WordTokenizer(vocabulary, max_tokens)
        pretrained = load_word_vectors(word_vectors, vocabulary) if word_vectors else None
        if pretrained is not None:
            embed_dim = pretrained.shape[1]
        if embed_dim % num_heads:
            raise ValueError(
                f"The word embeddings are {embed_dim}-d, which {num_heads} attention heads do not divide: set "
                f"MODEL.RESTR.LANGUAGE.NUM_HEADS to a divisor of {embed_dim}."
            )
        self.embedding = nn.Embedding(len(vocabulary), embed_dim, padding_idx=self.tokenizer.pad_id)
        self.register_buffer("pos_emb_l", sinusoidal_positions(max_tokens, embed_dim)[None], persistent=False)
        rates = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.blocks = nn.ModuleList(
            PostNormBlock(embed_dim, num_heads, int(embed_dim * mlp_ratio), dropout, rate) for rate in rates
        )
        self.proj_lang = nn.Linear(embed_dim, out_dim)
        self.lang_norm = nn.LayerNorm(out_dim)
        self.apply(init_restr_weights)
        with torch.no_grad():
            if pretrained is not None:
                self.embedding.weight.copy_(pretrained)
            self.embedding.weight[self.tokenizer.pad_id] = 0

    @classmethod
    def from_config(cls, cfg: CfgNode, out_dim: int) -> dict:
        language = cfg.MODEL.RESTR.LANGUAGE
        return {
            "vocabulary": load_vocabulary(language.VOCABULARY),
            "out_dim": out_dim,
            "word_vectors": language.WORD_VECTORS,
            "embed_dim": language.EMBED_DIM,
            "num_layers": language.NUM_LAYERS,
            "num_heads": language.NUM_HEADS or cfg.MODEL.VIT.NUM_HEADS,
            "mlp_ratio": language.MLP_RATIO,
            "dropout": language.DROPOUT,
            "drop_path_rate": language.DROP_PATH_RATE,
            "max_tokens": language.MAX_TOKENS,
        }

    def forward(self, sentences: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """B sentences -> features [B, T, out_dim], padding mask [B, T], unknown-word counts."""
        tokenized = self.tokenizer(sentences)
        _log_unknown(tokenized, sentences)
        x = self.embedding(tokenized.token_ids.to(device)) + self.pos_emb_l
        for block in self.blocks:
            x = block(x)
        return self.lang_norm(self.proj_lang(x)), tokenized.padding_mask.to(device), tokenized.num_unknown


@RESTR_LANGUAGE_ENCODER_REGISTRY.register()
class HuggingFaceEncoder(nn.Module):
    """A local Hugging Face encoder (BERT-style: ``last_hidden_state``) with its own tokenizer,
    then ``proj_lang`` and ``lang_norm`` to the fusion width. Loaded with local files only: no
    network access is attempted."""

    @configurable
    def __init__(self, *, model_dir: str, out_dim: int, max_tokens: int = 20) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        model_dir = resolve_asset(model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(
                f"MODEL.RESTR.LANGUAGE.HF_MODEL={model_dir!r} is not a local Hugging Face model folder "
                f"(config.json, weights and tokenizer files): {e}"
            ) from e
        self.max_tokens = max_tokens
        self.proj_lang = nn.Linear(self.model.config.hidden_size, out_dim)
        self.lang_norm = nn.LayerNorm(out_dim)
        init_restr_weights(self.proj_lang)

    @classmethod
    def from_config(cls, cfg: CfgNode, out_dim: int) -> dict:
        language = cfg.MODEL.RESTR.LANGUAGE
        return {"model_dir": language.HF_MODEL, "out_dim": out_dim, "max_tokens": language.MAX_TOKENS}

    def forward(self, sentences: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """B sentences -> features [B, T, out_dim], padding mask [B, T], unknown-word counts."""
        for sentence in sentences:
            if not sentence.strip():
                raise ValueError(f"Empty referring expression {sentence!r}: it has no words to encode.")
        encoded = self.tokenizer(
            sentences, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        unk_id = self.tokenizer.unk_token_id
        num_unknown = [int((ids == unk_id).sum()) for ids in encoded["input_ids"]]
        hidden = self.model(**{name: tensor.to(device) for name, tensor in encoded.items()}).last_hidden_state
        return self.lang_norm(self.proj_lang(hidden)), encoded["attention_mask"].to(device) == 0, num_unknown


def build_language_encoder(cfg: CfgNode, out_dim: int) -> nn.Module:
    """The encoder named by MODEL.RESTR.LANGUAGE.NAME, projecting to ``out_dim``."""
    name = cfg.MODEL.RESTR.LANGUAGE.NAME
    if name not in RESTR_LANGUAGE_ENCODER_REGISTRY:
        raise KeyError(
            f"MODEL.RESTR.LANGUAGE.NAME={name!r} is not a ReSTR language encoder; choose one of "
            f"{sorted(k for k, _ in RESTR_LANGUAGE_ENCODER_REGISTRY)}."
        )
    return RESTR_LANGUAGE_ENCODER_REGISTRY.get(name)(cfg, out_dim)
