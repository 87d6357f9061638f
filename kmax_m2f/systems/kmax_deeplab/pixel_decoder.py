"""kMaX-DeepLab's enhanced pixel decoder (Yu et al., "k-means Mask Transformer", ECCV 2022).

Backbone features from stride 32 down to stride 4 (or 2), each normalised by a channels-first
LayerNorm, are decoded coarse to fine: one :class:`BlockGroup` per stride (axial-attention blocks
at strides 32 and 16, bottlenecks below), and between stages a :class:`ResizedFuse` that projects
and upsamples the coarse output and adds the projected backbone skip. Each stage outputs 4x its
base width: 2048 / 1024 / 512 / 256 channels with the default bases 512 / 256 / 128 / 64.

The axial attention carries relative position encodings sized for one fixed input size (kMaX pads
every image to INPUT.IMAGE_SIZE), so the decoder is built for that size.

Module and parameter names follow the official PyTorch port (bytedance/kmax-deeplab), so its
checkpoints load with no missing or unexpected keys: ``_in_norms.{i}``, ``_stages.{i}._blocks.{j}``,
``_resized_fuses.{i}._conv_bn_{low,high}``.
"""
from collections.abc import Sequence
from typing import Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

from ...config import fixed_image_size
from ...layers import LayerNorm2d
from .layers import BlockGroup, ConvBN, gelu_then_convolutions, tf_align_corners

__all__ = ["ResizedFuse", "kMaXPixelDecoder", "kmax_feature_size"]

# The kMaX transformer decoder reads the outputs at strides 32, 16 and 8.
KMAX_NUM_MULTI_SCALE_FEATURES = 3


def kmax_feature_size(image_size: int, stride: int) -> int:
    """Size of a backbone feature map at ``stride`` for an input of ``image_size`` pixels.

    kMaX uses odd sizes ``k * stride + 1`` (TF's align-corners convention: 1281 -> 41 at stride
    32, i.e. (1281 - 1) / 32 + 1). Backbones with "same"-padded strided convolutions give
    ceil(image_size / stride), which this equals for every odd size and every multiple of
    ``stride`` (the rule of the official port, which the relative encodings must follow).
    """
    return image_size // stride + image_size % 2


class ResizedFuse(nn.Module):
    """Fuse a coarse decoder output into the next, finer backbone feature.

    low: GELU -> 1x1 conv+BN to ``out_channels`` -> bilinear resize to the fine size;
    high: GELU -> 1x1 conv+BN to ``out_channels``; output = low + high.
    A projection (``_conv_bn_low`` / ``_conv_bn_high``) exists only where the channels differ,
    as in the official layout.
    """

    def __init__(self, low_in_channels: int, high_in_channels: int, out_channels: int, norm: str = "SyncBN"):
        super().__init__()
        self.low_in_channels = low_in_channels
        self.high_in_channels = high_in_channels
        self.out_channels = out_channels
        if low_in_channels != out_channels:
            self._conv_bn_low = ConvBN(low_in_channels, out_channels, 1, norm=norm)
        if high_in_channels != out_channels:
            self._conv_bn_high = ConvBN(high_in_channels, out_channels, 1, norm=norm)
        self.recompute_input_activation = False

    def forward(self, lowres_x: torch.Tensor, highres_x: torch.Tensor) -> torch.Tensor:
        """lowres_x: [B, C_low, h, w]; highres_x: [B, C_high, H, W] -> [B, out_channels, H, W]."""
        if self.low_in_channels != self.out_channels:
            lowres_x = self._activated_projection(self._conv_bn_low, lowres_x)
        lowres_x = F.interpolate(
            lowres_x, size=highres_x.shape[-2:], mode="bilinear", align_corners=tf_align_corners(lowres_x.shape)
        )
        if self.high_in_channels != self.out_channels:
            highres_x = self._activated_projection(self._conv_bn_high, highres_x)
        return lowres_x + highres_x

    def _activated_projection(self, projection: ConvBN, x: torch.Tensor) -> torch.Tensor:
        (conv_output,) = gelu_then_convolutions(x, (projection.conv,), recompute=self.recompute_input_activation)
        return projection.norm_act(conv_output)


@SEM_SEG_HEADS_REGISTRY.register()
class kMaXPixelDecoder(nn.Module):
    """kMaX-DeepLab's pixel decoder (see the module docstring).

    ``forward_features(features)`` returns, as the official port does:
        panoptic_features: the last stage's output, [B, 4 * dec_channels[-1], H/4, W/4] (stride 2
            when a fifth, stride-2 input is used), for the final mask prediction;
        semantic_features: the raw (un-normalised) backbone features of the 1st, 3rd and 4th
            inputs (strides 32, 8, 4), for the auxiliary semantic head;
        multi_scale_features: the outputs of the first three stages (strides 32, 16, 8),
            [B, 4 * dec_channels[i], h_i, w_i], for the kMaX transformer decoder.
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        dec_layers: Sequence[int],
        dec_channels: Sequence[int],
        layer_types: Sequence[str],
        drop_path_prob: float,
        spatial_shape: Union[int, Sequence[int]],
        norm: str = "SyncBN",
        activation_checkpoint: bool = False,
    ):
        """
        Args:
            input_shape: backbone features to decode (coarsest first after sorting by stride).
            dec_layers: blocks per stage, coarsest first ([1, 5, 1, 1]).
            dec_channels: base width per stage ([512, 256, 128, 64]); stage i outputs 4x.
            layer_types: "axial" or "bottleneck" per stage.
            drop_path_prob: stochastic-depth rate of every block.
            spatial_shape: the fixed input size (H, W), or one int for a square; sizes the
                relative position encodings of the axial blocks.
            norm: batch-norm type of every layer, see :func:`kmax_layers.get_kmax_norm`.
            activation_checkpoint: recompute every block in backward instead of keeping its
                activations (less training memory for more time).
        """
        super().__init__()
        ordered = sorted(input_shape.items(), key=lambda item: -item[1].stride)
        num_stages = len(ordered)
        if not len(dec_layers) == len(dec_channels) == len(layer_types) == num_stages:
            raise ValueError(
                f"the pixel decoder has {num_stages} inputs {[name for name, _ in ordered]} but DEC_LAYERS "
                f"{list(dec_layers)}, DEC_CHANNELS {list(dec_channels)} and LAYER_TYPES {list(layer_types)} "
                f"must each have one entry per input"
            )
        if num_stages < 4:
            raise ValueError(
                f"the pixel decoder needs at least 4 inputs (strides 32, 16, 8, 4), got {[name for name, _ in ordered]}"
            )
        if isinstance(spatial_shape, int):
            spatial_shape = (spatial_shape, spatial_shape)
        self.spatial_shape = tuple(spatial_shape)
        self.in_features = [name for name, _ in ordered]
        in_channels = [shape.channels for _, shape in ordered]

        self._in_norms = nn.ModuleList(LayerNorm2d(channels) for channels in in_channels)
        stages, fuses = [], []
        for i, (_, shape) in enumerate(ordered):
            query_shape = tuple(kmax_feature_size(size, shape.stride) for size in self.spatial_shape)
            # Stage 0 reads the normalised backbone feature; later stages read a fuse output.
            inplanes = in_channels[0] if i == 0 else dec_channels[i]
            stages.append(
                BlockGroup(
                    inplanes, dec_channels[i], dec_layers[i], layer_types[i], query_shape,
                    drop_path_prob=drop_path_prob, norm=norm, activation_checkpoint=activation_checkpoint,
                )
            )
            if i > 0:
                fuses.append(ResizedFuse(4 * dec_channels[i - 1], in_channels[i], dec_channels[i], norm=norm))
        self._stages = nn.ModuleList(stages)
        self._resized_fuses = nn.ModuleList(fuses)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        dec = cfg.MODEL.KMAX_DEEPLAB.PIXEL_DEC
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in dec.IN_FEATURES},
            "dec_layers": dec.DEC_LAYERS,
            "dec_channels": dec.DEC_CHANNELS,
            "layer_types": dec.LAYER_TYPES,
            "drop_path_prob": dec.DROP_PATH_PROB,
            "spatial_shape": fixed_image_size(cfg),
            "norm": cfg.MODEL.KMAX_DEEPLAB.NORM,
            "activation_checkpoint": dec.ACTIVATION_CHECKPOINT,
        }

    def forward_features(
        self, features: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """
        Args:
            features: backbone maps by name, [B, C_i, h_i, w_i] at the fixed input size.

        Returns:
            (panoptic_features, semantic_features, multi_scale_features), see the class docstring.
        """
        outputs = []
        x = self._in_norms[0](features[self.in_features[0]])
        for i, stage in enumerate(self._stages):
            if i > 0:
                skip = self._in_norms[i](features[self.in_features[i]])
                x = self._resized_fuses[i - 1](x, skip)
            x = stage(x)
            outputs.append(x)
        semantic_features = [features[self.in_features[i]] for i in (0, 2, 3)]
        return outputs[-1], semantic_features, outputs[:KMAX_NUM_MULTI_SCALE_FEATURES]
