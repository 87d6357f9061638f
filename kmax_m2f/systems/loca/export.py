"""A LOCA checkpoint's ViT as ``MODEL.WEIGHTS`` for another config (StructToken, ReSTR, ...)."""
import logging
from collections.abc import Mapping

import torch
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY

from ...converted_weights import vit_pos_grid
from ...modeling.backbone.vit import resize_pos_embed

__all__ = ["ENCODER_PREFIXES", "export_backbone"]

logger = logging.getLogger(__name__)

# Where each of LOCA's two encoders sits in its checkpoints.
ENCODER_PREFIXES = {"teacher": "teacher.backbone.", "student": "backbone."}


def export_backbone(checkpoint: Mapping, cfg: CfgNode, encoder: str = "teacher") -> dict[str, torch.Tensor]:
    """The ViT of a LOCA checkpoint (``tools/train_net.py`` output: a "model" dict) renamed for
    the model ``cfg`` builds: under its backbone module (``backbone.`` for StructToken, ReSTR's
    ``encoder_v.``), the position embedding resampled to its ``MODEL.VIT.IMG_SIZE`` grid, the
    final LayerNorm dropped when it has none (``MODEL.VIT.FINAL_NORM`` False).

    Args:
        encoder: "teacher" (the EMA encoder, the default) or "student".
    Raises ValueError when the checkpoint holds no such encoder.
    """
    if encoder not in ENCODER_PREFIXES:
        raise ValueError(f"encoder must be one of {sorted(ENCODER_PREFIXES)}, got {encoder!r}")
    state = checkpoint.get("model", checkpoint)
    prefix = ENCODER_PREFIXES[encoder]
    vit = {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}
    if not vit:
        raise ValueError(f"no '{prefix}*' keys: not a LOCA checkpoint (tools/train_net.py with a configs/loca config)")
    if "ln1.weight" in vit and not cfg.MODEL.VIT.FINAL_NORM:
        logger.warning(
            "The target config has MODEL.VIT.FINAL_NORM False: LOCA's final LayerNorm (ln1) is left out. Set it "
            "True to fine-tune on the features LOCA trained."
        )
        vit = {key: tensor for key, tensor in vit.items() if not key.startswith("ln1.")}
    pos_embed = vit["pos_embed"].float()
    side = int(round((pos_embed.shape[1] - 1) ** 0.5))
    vit["pos_embed"] = resize_pos_embed(pos_embed, vit_pos_grid(cfg), (side, side), cfg.MODEL.VIT.INTERPOLATE_MODE)
    meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    target = getattr(meta_arch, "backbone_module_names", ("backbone",))[0]
    return {f"{target}.{key}": tensor for key, tensor in vit.items()}
