"""Checkpoints -> this package's StructToken state dicts: StructToken's official releases and the
mmseg-named ViTs they start from, and ViTs in timm's / DeiT's names.

mmseg saves ``{"state_dict": ..., "meta": ...}`` with the model's ``backbone.*`` and
``decode_head.*`` keys; the ViT checkpoints converted by mmseg's ``vitjax2mmseg.py`` hold the bare
backbone keys (``cls_token``, ``layers.0.ln1.weight``, ...). Here the backbone's names are already
mmseg's (:mod:`kmax_m2f.modeling.backbone.vit`) and the head's are the official ones, under
detectron2's ``sem_seg_head`` instead of ``decode_head``.

timm's ViTs (``blocks.0.norm1.weight``, ``blocks.0.attn.qkv.weight``, ...; a state dict, or a
``.safetensors`` file) and DeiT's releases (the same names under ``"model"``, the distilled ones
with a ``dist_token``) go through :func:`~kmax_m2f.modeling.backbone.vit_checkpoint.convert_timm_vit`.
"""

import logging
from collections.abc import Mapping

import torch

from ...modeling.backbone.vit import resize_pos_embed
from ...modeling.backbone.vit_checkpoint import convert_timm_vit

__all__ = ["convert_structtoken_checkpoint"]

logger = logging.getLogger(__name__)

_BACKBONE_KEYS = ("cls_token", "pos_embed", "patch_embed.", "layers.", "ln1.")


def convert_structtoken_checkpoint(
    checkpoint: Mapping, pos_grid_size: tuple[int, int], interpolate_mode: str = "bicubic", final_norm: bool = False
) -> dict[str, torch.Tensor]:
    """A StructToken checkpoint (mmseg), or a bare ViT (mmseg, timm or DeiT names), as this
    package's model state dict.

    Args:
        checkpoint: the loaded file: ``{"state_dict": ...}``, ``{"model": ...}`` or the state
            dict itself.
        pos_grid_size: the model's patch grid (``MODEL.VIT.IMG_SIZE`` / ``PATCH_SIZE``): the
            position embedding is resampled to it when the checkpoint's differs (a ViT
            pre-trained at 384 px has 24 x 24 entries, a 512 px model 32 x 32), as mmseg does
            when it loads one.
        interpolate_mode: how (``MODEL.VIT.INTERPOLATE_MODE``).
        final_norm: the model has the final LayerNorm (``MODEL.VIT.FINAL_NORM``); otherwise a
            checkpoint's ``ln1`` is dropped, as mmseg's non-strict loading does.

    Returns:
        ``backbone.*`` and ``sem_seg_head.*`` tensors.
    """
    state_dict = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("The checkpoint holds no state dict ('state_dict', 'model' or a mapping of tensors).")
    if any(key.startswith("blocks.") for key in state_dict):
        converted = convert_timm_vit(state_dict, tuple(pos_grid_size), final_norm, interpolate_mode)
        return {f"backbone.{key}": tensor for key, tensor in converted.items()}
    bare_backbone = not any(key.startswith(("backbone.", "decode_head.")) for key in state_dict)
    converted = {}
    for key, tensor in state_dict.items():
        if bare_backbone:
            if not key.startswith(_BACKBONE_KEYS):
                logger.info("Not a ViT backbone key, skipped: %s", key)
                continue
            key = f"backbone.{key}"
        elif key.startswith("decode_head."):
            key = "sem_seg_head." + key[len("decode_head."):]
        elif not key.startswith("backbone."):
            logger.info("Neither backbone nor decode_head, skipped: %s", key)
            continue
        if key.startswith("backbone.ln1.") and not final_norm:
            continue
        converted[key] = tensor
    if "backbone.pos_embed" in converted:
        pos_embed = converted["backbone.pos_embed"]
        patches = pos_embed.shape[1] - 1
        side = int(round(patches**0.5))
        if side * side != patches:
            raise ValueError(f"backbone.pos_embed has {patches} patch entries, not a square grid.")
        converted["backbone.pos_embed"] = resize_pos_embed(
            pos_embed.float(), tuple(pos_grid_size), (side, side), interpolate_mode
        ).to(pos_embed.dtype)
    return converted
