"""The ReSTR meta-architecture: image + sentence -> the one mask the sentence refers to."""
from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from torch import nn

from ...config import ConfigError
from ...modeling.meta_arch.common import REFER
from .fusion import MultimodalFusion
from .language import build_language_encoder

__all__ = ["REFER", "ReSTR", "patch_labels"]


def patch_labels(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 1, H, W] binary masks -> [B, 1, H / p, W / p]: 1 where the patch holds any foreground
    (the official labels: patch sum > 0.8)."""
    return F.max_pool2d(masks, kernel_size=patch_size, stride=patch_size)


@META_ARCH_REGISTRY.register()
class ReSTR(nn.Module):
    """ReSTR (Kim et al., CVPR 2022) with the official module names: ``encoder_v`` (the ViT,
    class token dropped), ``encoder_l`` (the language encoder), ``fusion_module`` (fusion
    encoders, patch logits, decoder).

    Inputs (list of dicts, one per image-sentence pair, from the ``refer`` mapper):
        image: [3, S, S] the image resized (longer side S) and centre-padded to S x S.
        sentence: the referring expression (str).
        image_box: (top, left, height, width) of the resized image inside the padded square.
        height, width: the original image size, the output's size.
        ref_mask: [S, S] uint8 target mask (training).
    Output per input: {"ref_mask": bool [height, width], "ref_logits": float [height, width],
    "num_unknown_words": int (words of the sentence the language encoder does not know)}.
    Training returns {"loss_pixel", "loss_patch"} (BCE with logits; patch loss weighted).
    """

    backbone_module_names = ("encoder_v",)

    @configurable
    def __init__(
        self,
        *,
        encoder_v: Backbone,
        encoder_l: nn.Module,
        fusion_module: MultimodalFusion,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
        patch_loss_weight: float = 0.1,
    ) -> None:
        """
        Args:
            encoder_v: a backbone whose single output is the [B, C, h, w] patch-feature map.
            encoder_l: a language encoder (see ``language.py``).
            fusion_module: fusion encoders + decoder.
            pixel_mean, pixel_std: input normalisation (the official 127.5 / 127.5).
            patch_loss_weight: lambda of the patch BCE term.
        """
        super().__init__()
        self.encoder_v = encoder_v
        self.encoder_l = encoder_l
        self.fusion_module = fusion_module
        self.patch_loss_weight = patch_loss_weight
        self.patch_size = encoder_v.size_divisibility
        (self.visual_feature,) = encoder_v.output_shape()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict[str, Any]:
        restr = cfg.MODEL.RESTR
        encoder_v = build_backbone(cfg)
        outputs = encoder_v.output_shape()
        if len(outputs) != 1:
            raise ConfigError(
                f"ReSTR needs a backbone with one output (a ViT's patch features), but {cfg.MODEL.BACKBONE.NAME} has "
                f"{sorted(outputs)}."
            )
        visual = next(iter(outputs.values()))
        size = cfg.INPUT.IMAGE_SIZE
        if not isinstance(size, int) or size % visual.stride:
            raise ConfigError(
                f"ReSTR takes square inputs: INPUT.IMAGE_SIZE must be one int, a multiple of the patch size "
                f"{visual.stride} (the official 480), got {size!r}."
            )
        dim = restr.FUSION.DIM or visual.channels
        return {
            "encoder_v": encoder_v,
            "encoder_l": build_language_encoder(cfg, dim),
            "fusion_module": MultimodalFusion(
                visual_dim=visual.channels,
                language_dim=dim,
                dim=dim,
                num_layers=restr.FUSION.NUM_LAYERS,
                num_heads=restr.FUSION.NUM_HEADS or cfg.MODEL.VIT.NUM_HEADS,
                mlp_ratio=restr.FUSION.MLP_RATIO,
                dropout=restr.FUSION.DROPOUT,
                drop_path_rate=restr.FUSION.DROP_PATH_RATE,
                shared=restr.FUSION.SHARED,
                num_upsampling=MultimodalFusion.num_upsampling_for(visual.stride),
            ),
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "patch_loss_weight": restr.PATCH_LOSS_WEIGHT,
        }

    @classmethod
    def output_tasks(cls, cfg: CfgNode) -> set[str]:
        """Referring segmentation only (what the evaluators are chosen for)."""
        return {REFER}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def predict_logits(
        self, images: torch.Tensor, sentences: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Normalised [B, 3, S, S] images and B sentences -> pixel logits [B, 1, S, S], patch
        logits [B, 1, S / p, S / p] and each sentence's number of unknown words."""
        features = self.encoder_v(images)[self.visual_feature]
        grid_size = tuple(features.shape[-2:])
        words, padding_mask, num_unknown = self.encoder_l(sentences, images.device)
        pixel_logits, patch_logits = self.fusion_module(
            features.flatten(2).transpose(1, 2), words, padding_mask, grid_size
        )
        return pixel_logits, patch_logits, num_unknown

    def forward(self, batched_inputs: list[dict]) -> Any:
        images = torch.stack([x["image"].to(self.device) for x in batched_inputs]).float()
        images = (images - self.pixel_mean) / self.pixel_std
        sentences = [x["sentence"] for x in batched_inputs]
        pixel_logits, patch_logits, num_unknown = self.predict_logits(images, sentences)
        if self.training:
            # The decoder returns to the input resolution: from_config requires a square input
            # whose side is a multiple of the patch, so logits and masks are both [B, 1, S, S].
            masks = torch.stack([x["ref_mask"].to(self.device) for x in batched_inputs]).float()[:, None]
            return {
                "loss_pixel": F.binary_cross_entropy_with_logits(pixel_logits, masks),
                "loss_patch": self.patch_loss_weight
                * F.binary_cross_entropy_with_logits(patch_logits, patch_labels(masks, self.patch_size)),
            }
        return [
            {**self.postprocess(logits[0], x), "num_unknown_words": unknown}
            for logits, x, unknown in zip(pixel_logits, batched_inputs, num_unknown)
        ]

    @staticmethod
    def postprocess(logits: torch.Tensor, inputs: dict) -> dict[str, torch.Tensor]:
        """[S, S] logits of the padded input -> the image's part, resized to (height, width):
        {"ref_mask": logits >= 0 (sigmoid >= 0.5), "ref_logits"}."""
        top, left, height, width = (int(v) for v in inputs["image_box"])
        logits = logits[top : top + height, left : left + width]
        size = (int(inputs.get("height", height)), int(inputs.get("width", width)))
        logits = F.interpolate(logits[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        return {"ref_mask": logits >= 0, "ref_logits": logits}
