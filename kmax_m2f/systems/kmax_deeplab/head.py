"""kMaXDeepLabHead: kMaX's pixel decoder + kMaX transformer decoder, registered as a
semantic-segmentation head (the official port's arrangement, so ``sem_seg_head.pixel_decoder.*`` /
``sem_seg_head.predictor.*`` checkpoint names carry over)."""
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ...modeling.heads import PixelDecoderPredictorHead
from .transformer_decoder import KMAX_DECODER_REGISTRY


def build_kmax_pixel_decoder(cfg, input_shape: dict[str, ShapeSpec]) -> nn.Module:
    """The pixel decoder named by ``MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME`` (a SEM_SEG_HEADS_REGISTRY
    entry with ``forward_features``)."""
    name = cfg.MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME
    decoder = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(decoder, "forward_features", None)):
        raise ValueError(
            f"MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME={name!r} has no forward_features(features) method, so it "
            "cannot serve as kMaX's pixel decoder"
        )
    return decoder


@SEM_SEG_HEADS_REGISTRY.register()
class kMaXDeepLabHead(PixelDecoderPredictorHead):
    """kMaX's pixel decoder (MODEL.KMAX_DEEPLAB.PIXEL_DEC) and kMaX decoder (TRANS_DEC)."""

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        kmax = cfg.MODEL.KMAX_DEEPLAB
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in kmax.PIXEL_DEC.IN_FEATURES},
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_kmax_pixel_decoder(cfg, input_shape),
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "transformer_predictor": KMAX_DECODER_REGISTRY.get(kmax.TRANS_DEC.NAME)(cfg, input_shape),
        }

    def forward(self, features: dict[str, torch.Tensor]) -> dict:
        """Backbone features -> the kMaX decoder's outputs (see kMaXTransformerDecoder.forward)."""
        panoptic_features, semantic_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, panoptic_features, semantic_features)
