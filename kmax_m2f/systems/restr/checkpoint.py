"""Weights for ReSTR from outside: a timm ViT (the official start, ``vit_base_patch16_384``) or a
checkpoint of the official ReSTR code (SouthFlame/restr; none was released, but its training
checkpoints have this layout). Both become ``encoder_v.*`` in the project ViT's names; the
official language / fusion keys are ReSTR's names already."""
from collections.abc import Mapping

import torch

from ...modeling.backbone.vit_checkpoint import convert_timm_vit

__all__ = ["convert_restr_checkpoint"]

_VISUAL = "encoder_v."


def convert_restr_checkpoint(
    checkpoint: Mapping, pos_grid_size: tuple[int, int], final_norm: bool = True, interpolate_mode: str = "bicubic"
) -> dict[str, torch.Tensor]:
    """``checkpoint``: a bare timm ViT state dict, an official ReSTR state dict
    (``encoder_v.*``, ``encoder_l.*``, ``fusion_module.*``), or either under "model" /
    "state_dict". Returns the model state dict keys this package's ReSTR uses."""
    state_dict = checkpoint
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("The checkpoint holds no state dict.")
    if not any(key.startswith(_VISUAL) for key in state_dict):
        vit = convert_timm_vit(state_dict, pos_grid_size, final_norm, interpolate_mode)
        return {_VISUAL + key: tensor for key, tensor in vit.items()}
    visual = {key[len(_VISUAL):]: tensor for key, tensor in state_dict.items() if key.startswith(_VISUAL)}
    converted = {key: tensor for key, tensor in state_dict.items() if not key.startswith(_VISUAL)}
    converted.update({_VISUAL + key: tensor
                      for key, tensor in convert_timm_vit(visual, pos_grid_size, final_norm, interpolate_mode).items()})
    return converted
