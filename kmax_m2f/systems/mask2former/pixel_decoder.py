"""Mask2Former's multi-scale deformable-attention pixel decoder.

res3..res5 are projected to ``conv_dim`` channels and refined jointly by a stack of
deformable-attention encoder layers (every pixel of every level attends to a few sampled points on
all levels); an FPN step then adds the higher-resolution maps (res2) and a 1x1 conv produces the
per-pixel mask embeddings at stride 4.

Module and parameter names follow the official implementation so its checkpoints load unchanged.
"""
import copy
from typing import Callable, Optional

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

from ...layers.ms_deform_attn import MSDeformAttn
from ...layers.precision import at_least_float32
from ...layers.recompute import checkpointed_call
from ...modeling.position_encoding import PositionEmbeddingSine

# Mask2Former's transformer decoder always reads three scales.
MASKFORMER_NUM_FEATURE_LEVELS = 3
# The deformable encoder's FFN width is fixed (it does not follow MASK_FORMER.DIM_FEEDFORWARD).
ENCODER_DIM_FEEDFORWARD = 1024


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    activations = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in activations:
        raise ValueError(f"activation must be one of {sorted(activations)}, got {name!r}")
    return activations[name]


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, each with residual and post-norm.

    With ``feed_forward_checkpoint`` the first norm and the FFN keep only their input for
    backward and run again there: the FFN's [B, S, d_ffn] hidden is the largest activation of the
    layer (at 512x512, batch 2, 52 of the 127 MiB a layer keeps, for one more d_model -> d_ffn
    matmul in backward). The gradients are the same.
    """

    def __init__(
        self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
        n_levels: int = 4, n_heads: int = 8, n_points: int = 4, feed_forward_checkpoint: bool = False,
    ):
        super().__init__()
        self.feed_forward_checkpoint = feed_forward_checkpoint
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """src, pos: [B, S, C]; reference_points: [B, S, L, 2]; returns [B, S, C]."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src, ffn = checkpointed_call(
            self._norm_and_feed_forward, src + self.dropout1(attended), enabled=self.feed_forward_checkpoint
        )
        return self.norm2(src + self.dropout3(ffn))

    def _norm_and_feed_forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, C] attention residual -> (its norm, the FFN of that norm), both [B, S, C]."""
        src = self.norm1(src)
        return src, self.linear2(self.dropout2(self.activation(self.linear1(src))))


class MSDeformAttnTransformerEncoder(nn.Module):
    """``num_layers`` copies of ``encoder_layer``; with ``activation_checkpoint`` each layer keeps
    only its input for backward and runs again there (at 512x512, batch 2, about 115 MiB less per
    layer for one more forward pass of the encoder)."""

    def __init__(
        self, encoder_layer: MSDeformAttnTransformerEncoderLayer, num_layers: int, activation_checkpoint: bool = False
    ):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.activation_checkpoint = activation_checkpoint

    @staticmethod
    def get_reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor, device) -> torch.Tensor:
        """Every pixel's centre as a reference point on every level.

        Args:
            spatial_shapes: [L, 2] (H, W) per level.
            valid_ratios: [B, L, 2] (w, h) fraction of each level that is not padding.

        Returns:
            [B, S, L, 2] normalised (x, y).
        """
        per_level = []
        for level, (height, width) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=device),
                torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(per_level, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self, src: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor, pos: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        output = src
        inputs = (pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        for layer in self.layers:
            output = checkpointed_call(layer, output, *inputs, enabled=self.activation_checkpoint)
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the position encodings, runs the encoder."""

    def __init__(
        self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, dim_feedforward: int = 1024,
        dropout: float = 0.1, activation: str = "relu", num_feature_levels: int = 4, enc_n_points: int = 4,
        activation_checkpoint: bool = False, feed_forward_checkpoint: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        # A whole-layer recomputation already covers the FFN's; nesting would run the FFN thrice.
        layer = MSDeformAttnTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points,
            feed_forward_checkpoint=feed_forward_checkpoint and not activation_checkpoint,
        )
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers, activation_checkpoint)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # The deformable layers have their own (direction-grid) initialisation, which the blanket
        # xavier above would overwrite.
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """[B, H, W] padding mask -> [B, 2] (w, h) fraction of valid pixels."""
        _, height, width = mask.shape
        valid_height = torch.sum(~mask[:, :, 0], 1)
        valid_width = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        """
        Args:
            srcs, pos_embeds: per level (coarsest first), [B, C, H_l, W_l].

        Returns:
            memory [B, S, C], spatial_shapes [L, 2] int64, level_start_index [L] int64.
        """
        # The backbone's padding is not tracked here (as in the official model): no pixel is masked.
        masks = [torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool) for x in srcs]
        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, pos_flatten, mask_flatten)
        return memory, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder of Mask2Former (see module docstring).

    ``forward_features(features)`` returns:
        mask_features: [B, mask_dim, H/4, W/4] (at ``common_stride``);
        the coarsest refined map [B, conv_dim, H/32, W/32];
        multi_scale_features: the 3 coarsest refined maps (strides 32, 16, 8), [B, conv_dim, h, w].
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: str,
        transformer_in_features: list[str],
        common_stride: int,
        transformer_n_points: int = 4,
        transformer_activation_checkpoint: bool = False,
        transformer_ffn_checkpoint: bool = True,
    ):
        super().__init__()
        ordered = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features = [name for name, _ in ordered]
        self.feature_strides = [shape.stride for _, shape in ordered]
        self.feature_channels = [shape.channels for _, shape in ordered]
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES {missing} are not among the pixel decoder's "
                f"inputs {self.in_features} (MODEL.SEM_SEG_HEAD.IN_FEATURES)"
            )
        transformer_ordered = [(name, shape) for name, shape in ordered if name in transformer_in_features]
        self.transformer_in_features = [name for name, _ in transformer_ordered]
        self.transformer_feature_strides = [shape.stride for _, shape in transformer_ordered]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        if conv_dim % 32 != 0:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.CONVS_DIM={conv_dim} must be a multiple of 32 (GroupNorm(32))")

        # 1x1 conv + GroupNorm per encoder level, coarsest first.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(shape.channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for _, shape in transformer_ordered[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
            activation_checkpoint=transformer_activation_checkpoint,
            feed_forward_checkpoint=transformer_ffn_checkpoint,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = MASKFORMER_NUM_FEATURE_LEVELS
        self.common_stride = common_stride
        # FPN levels between the finest encoder level and common_stride (res2 for the defaults).
        self.num_fpn_levels = int(np.log2(min(self.transformer_feature_strides)) - np.log2(common_stride))
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for index, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output_conv = Conv2d(
                conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                norm=get_norm(norm, conv_dim), activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            # Official checkpoint names: adapter_1 / layer_1 for the finest level.
            self.add_module(f"adapter_{index + 1}", lateral_conv)
            self.add_module(f"layer_{index + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Top-down order (coarse to fine), as the forward pass walks them.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            # The official decoder reads the transformer decoder's head count here too.
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "transformer_dim_feedforward": ENCODER_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "transformer_activation_checkpoint": head.TRANSFORMER_ENC_ACTIVATION_CHECKPOINT,
            "transformer_ffn_checkpoint": head.TRANSFORMER_ENC_FFN_CHECKPOINT,
            "common_stride": head.COMMON_STRIDE,
        }

    @torch.autocast("cuda", enabled=False)
    def forward_features(self, features: dict[str, torch.Tensor]):
        srcs, pos = [], []
        for index, name in enumerate(self.transformer_in_features[::-1]):
            # The deformable kernel runs in float32 (no half path in the encoder's numerics).
            x = at_least_float32(features[name])
            srcs.append(self.input_proj[index](x))
            pos.append(self.pe_layer(x))
        memory, spatial_shapes, level_start_index = self.transformer(srcs, pos)

        batch = memory.shape[0]
        level_sizes = spatial_shapes.prod(1).tolist()
        # Each level as a contiguous [B, C, h, w] map: the bare transpose would be a channels-last
        # view, on which the CPU's bilinear upsampling below runs about 6x slower than copy +
        # NCHW upsampling (800x1333: 290 ms -> 50 ms), and so would its backward.
        outputs = [
            level.transpose(1, 2).reshape(batch, -1, int(h), int(w)).contiguous()
            for level, (h, w) in zip(torch.split(memory, level_sizes, dim=1), spatial_shapes.tolist())
        ]
        for index, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            lateral = self.lateral_convs[index](at_least_float32(features[name]))
            upsampled = F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(self.output_convs[index](lateral + upsampled))

        multi_scale_features = outputs[: self.maskformer_num_feature_levels]
        return self.mask_features(outputs[-1]), outputs[0], multi_scale_features


def build_pixel_decoder(cfg, input_shape: dict[str, ShapeSpec]) -> nn.Module:
    """The pixel decoder named by ``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} has no forward_features(features) and "
            f"cannot serve as a pixel decoder."
        )
    return model
