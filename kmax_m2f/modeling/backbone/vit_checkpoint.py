"""timm-named ViT weights (timm's ``vit_*`` / DeiT checkpoints, Segmenter- and ReSTR-style
``VisionTransformer`` modules) -> the mmseg names of :mod:`kmax_m2f.modeling.backbone.vit`.

    cls_token, pos_embed                 -> cls_token, pos_embed (resampled to the model's grid)
    patch_embed.proj.*                   -> patch_embed.projection.*
    blocks.{i}.norm1 / norm2             -> layers.{i}.ln1 / ln2
    blocks.{i}.attn.qkv.*                -> layers.{i}.attn.attn.in_proj_*
    blocks.{i}.attn.proj.*               -> layers.{i}.attn.attn.out_proj.*
    blocks.{i}.mlp.fc1 / fc2             -> layers.{i}.ffn.layers.0.0 / ffn.layers.1
    norm.*                               -> ln1.* (the final LayerNorm, when the model has it)

The classifier (``head``, ``head_dist``, ``fc_norm``) is dropped; so is DeiT's distillation token,
with its position-embedding entry. A position embedding without a class-token entry (timm's
``no_embed_class`` models) gets a zero one, which computes the same thing. Register tokens have
no counterpart and are refused.
"""
import logging
import re
from collections.abc import Mapping

import torch

from .vit import resize_pos_embed

__all__ = ["convert_timm_vit"]

logger = logging.getLogger(__name__)

_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.projection."),
    (re.compile(r"^blocks\.(\d+)\.norm1\."), r"layers.\1.ln1."),
    (re.compile(r"^blocks\.(\d+)\.norm2\."), r"layers.\1.ln2."),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"layers.\1.attn.attn.in_proj_\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\."), r"layers.\1.attn.attn.out_proj."),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\."), r"layers.\1.ffn.layers.0.0."),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\."), r"layers.\1.ffn.layers.1."),
    (re.compile(r"^norm\."), "ln1."),
    (re.compile(r"^(cls_token|pos_embed)$"), r"\1"),
)
_DROPPED = re.compile(r"^(head|head_dist|fc_norm|pre_logits|dist_token)(\.|$)")


def convert_timm_vit(
    state_dict: Mapping[str, torch.Tensor],
    pos_grid_size: tuple[int, int],
    final_norm: bool = True,
    interpolate_mode: str = "bicubic",
) -> dict[str, torch.Tensor]:
    """A timm-named ViT state dict (no prefix) as the project ViT's (see the module doc).

    Args:
        pos_grid_size: the model's patch grid; the position embedding is resampled to it.
        final_norm: keep ``norm`` as ``ln1`` (else it is dropped, the model having none).
    Raises ValueError on a key that is neither a ViT key nor a classifier key.
    """
    if "reg_token" in state_dict:
        raise ValueError("The ViT has register tokens (reg_token), which the project's ViT does not have.")
    distilled = "dist_token" in state_dict
    converted = {}
    for key, tensor in state_dict.items():
        if _DROPPED.match(key):
            logger.info("Classifier / distillation key dropped: %s", key)
            continue
        for pattern, replacement in _RENAMES:
            if pattern.match(key):
                new_key = pattern.sub(replacement, key)
                break
        else:
            raise ValueError(f"{key!r} is not a timm ViT key (expected patch_embed / blocks / norm / cls_token ...)")
        if new_key.startswith("ln1.") and not final_norm:
            continue
        converted[new_key] = tensor
    if "pos_embed" in converted:
        pos_embed = converted["pos_embed"].float()
        if distilled:
            pos_embed = torch.cat([pos_embed[:, :1], pos_embed[:, 2:]], dim=1)
        if int(round(pos_embed.shape[1] ** 0.5)) ** 2 == pos_embed.shape[1]:
            pos_embed = torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[2]), pos_embed], dim=1)
        patches = pos_embed.shape[1] - 1
        side = int(round(patches**0.5))
        if side * side != patches:
            raise ValueError(f"pos_embed has {patches} patch entries, not a square grid")
        converted["pos_embed"] = resize_pos_embed(pos_embed, tuple(pos_grid_size), (side, side), interpolate_mode)
    return converted
