"""The head arrangement of the official Mask2Former and kMaX-DeepLab code: a pixel decoder and a
transformer predictor under one semantic-segmentation head."""
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

__all__ = ["PixelDecoderPredictorHead"]


class PixelDecoderPredictorHead(nn.Module):
    """A SEM_SEG_HEAD made of a pixel decoder and a transformer predictor, named
    ``pixel_decoder`` and ``predictor`` so that official ``sem_seg_head.pixel_decoder.*`` /
    ``sem_seg_head.predictor.*`` checkpoint keys carry over. A subclass builds both in its
    ``from_config`` and defines ``forward``."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        transformer_predictor: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
    ):
        """
        Args:
            input_shape: the backbone features the head reads, by name.
            num_classes: K, without "no object".
            pixel_decoder, transformer_predictor: the two halves.
            loss_weight, ignore_value: MODEL.SEM_SEG_HEAD's keys, kept for detectron2's interface.
        """
        super().__init__()
        ordered = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features = [name for name, _ in ordered]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.num_classes = num_classes
