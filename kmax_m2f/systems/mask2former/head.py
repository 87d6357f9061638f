"""MaskFormerHead: pixel decoder + transformer decoder, registered as a semantic-segmentation head
(the official Mask2Former arrangement, so ``sem_seg_head.pixel_decoder.*`` / ``sem_seg_head.predictor.*``
checkpoint names carry over)."""
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ...modeling.heads import PixelDecoderPredictorHead
from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import build_transformer_decoder

# MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE values that do not name a backbone feature.
_PIXEL_DECODER_OUTPUTS = ("multi_scale_pixel_decoder", "transformer_encoder", "pixel_embedding")


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(PixelDecoderPredictorHead):
    @configurable
    def __init__(self, input_shape: dict[str, ShapeSpec], *, transformer_in_feature: str, **kwargs):
        """
        Args:
            transformer_in_feature: what the predictor attends to (MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE).
            kwargs: :class:`PixelDecoderPredictorHead`'s arguments.
        """
        super().__init__(input_shape, **kwargs)
        self.transformer_in_feature = transformer_in_feature

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        head, mf = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
        if mf.TRANSFORMER_IN_FEATURE == "pixel_embedding":
            predictor_in_channels = head.MASK_DIM
        elif mf.TRANSFORMER_IN_FEATURE in _PIXEL_DECODER_OUTPUTS:
            predictor_in_channels = head.CONVS_DIM
        else:
            predictor_in_channels = input_shape[mf.TRANSFORMER_IN_FEATURE].channels
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "ignore_value": head.IGNORE_VALUE,
            "num_classes": head.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": head.LOSS_WEIGHT,
            "transformer_in_feature": mf.TRANSFORMER_IN_FEATURE,
            "transformer_predictor": build_transformer_decoder(cfg, predictor_in_channels, mask_classification=True),
        }

    def forward(self, features: dict[str, torch.Tensor], mask: Optional[torch.Tensor] = None) -> dict:
        mask_features, encoder_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        if self.transformer_in_feature == "multi_scale_pixel_decoder":
            return self.predictor(multi_scale_features, mask_features, mask)
        if self.transformer_in_feature == "transformer_encoder":
            return self.predictor(encoder_features, mask_features, mask)
        if self.transformer_in_feature == "pixel_embedding":
            return self.predictor(mask_features, mask_features, mask)
        return self.predictor(features[self.transformer_in_feature], mask_features, mask)
