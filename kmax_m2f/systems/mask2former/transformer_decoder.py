"""Mask2Former's multi-scale masked-attention transformer decoder.

Learnable queries attend, layer after layer and round-robin over the three coarsest pixel-decoder
scales, only to the pixels inside the mask they predicted one layer earlier (masked attention),
then to each other, then pass an FFN. Class logits and mask logits are predicted from the initial
queries and after every layer, and all of these predictions are supervised.

Module and parameter names follow the official implementation so its checkpoints load unchanged.
"""
from typing import Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from torch import nn
from torch.nn import functional as F

from ...modeling.position_encoding import PositionEmbeddingSine

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """Mask2Former's transformer decoders, named by
MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME (the official registry's name and contract, so that
decoders written for the official code register here unchanged).

Contract: ``TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)``,
``in_channels`` being the channels of the features MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE selects;
the module's ``forward(features, mask_features, mask)`` takes the multi-scale features (a list of
[B, C, H_l, W_l]), the per-pixel embeddings [B, D, H/4, W/4] and an optional padding mask, and
returns {"pred_logits" [B, Q, K+1], "pred_masks" [B, Q, H/4, W/4], "aux_outputs": one such dict
per intermediate prediction}.
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


def _with_pos(tensor: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


class _ResidualAttention(nn.Module):
    """Shared init and pre-/post-norm residual wiring of the attention layers."""

    normalize_before: bool
    norm: nn.LayerNorm
    dropout: nn.Dropout

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _residual(self, tgt: torch.Tensor, attend) -> torch.Tensor:
        if self.normalize_before:
            return tgt + self.dropout(attend(self.norm(tgt)))
        return self.norm(tgt + self.dropout(attend(tgt)))


class SelfAttentionLayer(_ResidualAttention):
    """Query-to-query attention. Tensors are sequence-first: [Q, B, C]."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        self._reset_parameters()

    def forward(
        self, tgt: torch.Tensor, tgt_mask: Optional[torch.Tensor] = None,
        tgt_key_padding_mask: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        def attend(x):
            q = k = _with_pos(x, query_pos)
            return self.self_attn(q, k, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]

        return self._residual(tgt, attend)


class CrossAttentionLayer(_ResidualAttention):
    """Query-to-pixel attention, optionally masked. Queries [Q, B, C], memory [HW, B, C]."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        self._reset_parameters()

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: Optional[torch.Tensor] = None,
        memory_key_padding_mask: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """memory_mask: [B * heads, Q, HW] bool, True where a query may NOT attend."""

        def attend(x):
            return self.multihead_attn(
                query=_with_pos(x, query_pos), key=_with_pos(memory, pos), value=memory,
                attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
            )[0]

        return self._residual(tgt, attend)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        def ffn(x):
            return self.linear2(self.dropout(F.relu(self.linear1(x))))

        if self.normalize_before:
            return tgt + self.dropout(ffn(self.norm(tgt)))
        return self.norm(tgt + self.dropout(ffn(tgt)))


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < self.num_layers - 1:
                x = F.relu(x)
        return x


def masked_attention_mask(mask_logits: torch.Tensor, target_size, num_heads: int) -> torch.Tensor:
    """The attention mask of the next layer from the current mask predictions.

    A query may attend to a pixel where its predicted mask (resized to the next layer's scale)
    has probability >= 0.5. A query whose mask is empty everywhere attends everywhere instead:
    an all-masked attention row would be a softmax over nothing (NaN).

    Args:
        mask_logits: [B, Q, H, W].
        target_size: (h, w) of the scale the next layer attends to.

    Returns:
        [B * num_heads, Q, h * w] bool, True where attention is NOT allowed (PyTorch's convention).
    """
    resized = F.interpolate(mask_logits, size=target_size, mode="bilinear", align_corners=False)
    blocked = resized.sigmoid().flatten(2) < 0.5
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    return blocked.unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(0, 1).detach()


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ):
        """
        Args:
            in_channels: channels of the pixel decoder's multi-scale features.
            num_classes: K; the class head predicts K + 1 logits (the last is "no object").
            dec_layers: masked-attention layers (the config's DEC_LAYERS minus the prediction
                made from the initial queries).
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder only supports mask classification")
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout=0.0, normalize_before=pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                projection = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(projection)
                self.input_proj.append(projection)
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_classification: bool):
        mf = cfg.MODEL.MASK_FORMER
        if mf.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mf.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # DEC_LAYERS counts predictions (and so losses): the initial queries' prediction
            # is one of them.
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        }

    def forward(self, x: list[torch.Tensor], mask_features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
        """
        Args:
            x: the 3 multi-scale features, coarsest first, [B, C, H_l, W_l].
            mask_features: [B, mask_dim, H/4, W/4].
            mask: unused (padding masks do not change the results of the published models).

        Returns:
            {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H/4, W/4],
             "aux_outputs": the same for every earlier prediction, first to last}.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        src, pos, sizes = [], [], []
        for level in range(self.num_feature_levels):
            sizes.append(x[level].shape[-2:])
            pos.append(self.pe_layer(x[level]).flatten(2).permute(2, 0, 1))
            projected = self.input_proj[level](x[level]).flatten(2) + self.level_embed.weight[level][None, :, None]
            src.append(projected.permute(2, 0, 1))

        batch = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)

        class_logits, mask_logits, attn_mask = self.forward_prediction_heads(output, mask_features, sizes[0])
        predictions = [(class_logits, mask_logits)]
        for layer in range(self.num_layers):
            level = layer % self.num_feature_levels
            output = self.transformer_cross_attention_layers[layer](
                output, src[level], memory_mask=attn_mask, pos=pos[level], query_pos=query_embed
            )
            output = self.transformer_self_attention_layers[layer](output, query_pos=query_embed)
            output = self.transformer_ffn_layers[layer](output)
            class_logits, mask_logits, attn_mask = self.forward_prediction_heads(
                output, mask_features, sizes[(layer + 1) % self.num_feature_levels]
            )
            predictions.append((class_logits, mask_logits))

        return {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]],
        }

    def forward_prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor, attn_mask_target_size):
        """Class logits [B, Q, K+1], mask logits [B, Q, H, W] and the next layer's attention mask."""
        decoded = self.decoder_norm(output).transpose(0, 1)
        class_logits = self.class_embed(decoded)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        attn_mask = masked_attention_mask(mask_logits, attn_mask_target_size, self.num_heads)
        return class_logits, mask_logits, attn_mask
