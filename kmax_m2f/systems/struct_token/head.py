"""StructToken's segmentation head (Lin et al., "StructToken: Rethinking Semantic Segmentation
with Structural Prior", 2022).

One learnt "structure token" map per class, [K, h, w], interacts with the backbone's feature map
(C channels) channel by channel, block after block, and becomes the class score map. Three kinds
of interaction block (``MODEL.STRUCT_TOKEN.BLOCK``):

- ``CSE`` (cross-slice extraction): the token maps attend over the feature maps' channels
  (a [K, C] attention), then an FFN on the tokens and, except in the last block, on the features;
- ``SSE`` (self-slice extraction): tokens and features concatenated, [K + C] channels, attend
  over themselves ([K + C, K + C]), FFN, split again;
- ``PWE`` (point-wise extraction): the concatenation goes through a projection, a 1x1 conv and
  a projection instead of attention, then an FFN.

Module and parameter names are the official code's (RockeyCoss/StructToken's
``*ExtracStructTokenHead``: ``kernels``, ``dec_proj``, ``layers.{i}.{cross_attn, attn, ffn1,
ffn2}``, ``residual_block``), so its ``decode_head.*`` keys are this head's keys.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torchvision.ops import StochasticDepth

from ...config import ConfigError
from ...layers import LayerNorm2d

__all__ = [
    "BLOCK_TYPES",
    "ChannelAttention",
    "ConvFFN",
    "ProjectionBlock",
    "StructTokenHead",
]

# The official code's LayerNorms: 1e-6 in the projection and output blocks; the FFNs get the
# head's norm config, which names no eps, so mmcv's default 1e-5 applies there.
_PROJECTION_NORM_EPS = 1e-6
_FFN_NORM_EPS = 1e-5


class ProjectionBlock(nn.Module):
    """1x1 conv -> LN -> GELU -> 3x3 depthwise conv -> LN -> GELU -> 1x1 conv -> LN (the
    official ``DepthWiseConvBlock``), used for queries, keys, values and outputs.
    LN normalises each pixel over the channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 1)
        self.norm1 = LayerNorm2d(in_channels, eps=_PROJECTION_NORM_EPS)
        self.conv2 = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels)
        self.norm2 = LayerNorm2d(in_channels, eps=_PROJECTION_NORM_EPS)
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1)
        self.norm3 = LayerNorm2d(out_channels, eps=_PROJECTION_NORM_EPS)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, h, w] -> [B, C_out, h, w]."""
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.norm3(self.conv3(x))


class ConvFFN(nn.Module):
    """The official ``GroupConvBlock``: 1x1 conv (d -> r d) -> LN -> GELU -> 3x3 conv with d
    groups -> LN -> GELU -> 1x1 conv (r d -> d) -> LN, added to the input through stochastic
    depth, then GELU."""

    def __init__(self, channels: int, expand_ratio: int, drop_path: float) -> None:
        super().__init__()
        hidden = channels * expand_ratio
        self.pwconv1 = nn.Conv2d(channels, hidden, 1)
        self.norm1 = LayerNorm2d(hidden, eps=_FFN_NORM_EPS)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=channels)
        self.norm2 = LayerNorm2d(hidden, eps=_FFN_NORM_EPS)
        self.pwconv2 = nn.Conv2d(hidden, channels, 1)
        self.norm3 = LayerNorm2d(channels, eps=_FFN_NORM_EPS)
        self.act = nn.GELU()
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d, h, w] -> [B, d, h, w]."""
        branch = self.act(self.norm1(self.pwconv1(x)))
        branch = self.act(self.norm2(self.dwconv(branch)))
        branch = self.norm3(self.pwconv2(branch))
        return self.act(x + self.drop_path(branch))


class ChannelAttention(nn.Module):
    """Single-head attention between channels (the official ``AttentionLayer``): each query
    channel's map attends over the key channels' maps,
    ``softmax(q k^T / sqrt(h w)) v`` with q [B, C_q, hw], k and v [B, C_kv, hw]; the result goes
    through ``out_project`` and is added to the query through stochastic depth."""

    def __init__(self, query_channels: int, kv_channels: int, attn_drop: float, proj_drop: float,
                 drop_path: float) -> None:
        super().__init__()
        self.query_map = ProjectionBlock(query_channels, query_channels)
        self.key_map = ProjectionBlock(kv_channels, kv_channels)
        self.value_map = ProjectionBlock(kv_channels, kv_channels)
        self.out_project = ProjectionBlock(query_channels, query_channels)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        """query [B, C_q, h, w], key_value [B, C_kv, h, w] -> [B, C_q, h, w]."""
        batch, query_channels, height, width = query.shape
        q = self.query_map(query).flatten(2)
        k = self.key_map(key_value).flatten(2)
        v = self.value_map(key_value).flatten(2)
        attention = torch.softmax(q @ k.transpose(1, 2) * (height * width) ** -0.5, dim=-1)  # [B, C_q, C_kv]
        attended = (self.attn_drop(attention) @ v).reshape(batch, query_channels, height, width)
        return query + self.drop_path(self.proj_drop(self.out_project(attended)))


class PointwiseInteraction(nn.Module):
    """The official ``PWConvAttentionLayer``: projection -> 1x1 conv -> projection, added to the
    input through stochastic depth."""

    def __init__(self, channels: int, proj_drop: float, drop_path: float) -> None:
        super().__init__()
        self.query_map = ProjectionBlock(channels, channels)
        self.out_project = ProjectionBlock(channels, channels)
        self.attn_pw_conv = nn.Conv2d(channels, channels, 1)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, C, h, w]."""
        branch = self.out_project(self.attn_pw_conv(self.query_map(x)))
        return x + self.drop_path(self.proj_drop(branch))


class CrossSliceExtractionBlock(nn.Module):
    """CSE: tokens attend over the features' channels; FFNs on tokens and (``ffn_features``)
    features."""

    def __init__(self, feature_channels: int, num_classes: int, expand_ratio: int, drop_rate: float,
                 attn_drop_rate: float, drop_path: float, ffn_features: bool) -> None:
        super().__init__()
        self.cross_attn = ChannelAttention(num_classes, feature_channels, attn_drop_rate, drop_rate, drop_path)
        self.ffn2 = ConvFFN(feature_channels, expand_ratio, drop_path) if ffn_features else None
        self.ffn1 = ConvFFN(num_classes, expand_ratio, drop_path)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, K, h, w], features [B, C, h, w] -> the same, updated."""
        tokens = self.ffn1(self.cross_attn(tokens, features))
        if self.ffn2 is not None:
            features = self.ffn2(features)
        return tokens, features


class SelfSliceExtractionBlock(nn.Module):
    """SSE: channel self-attention over tokens and features together, FFN, split. Blocks share
    one constructor signature; ``ffn_features`` (CSE's) changes nothing here: the joint FFN
    covers the features in every block, as in the official code."""

    def __init__(self, feature_channels: int, num_classes: int, expand_ratio: int, drop_rate: float,
                 attn_drop_rate: float, drop_path: float, ffn_features: bool) -> None:
        super().__init__()
        channels = num_classes + feature_channels
        self.cross_attn = ChannelAttention(channels, channels, attn_drop_rate, drop_rate, drop_path)
        self.ffn1 = ConvFFN(channels, expand_ratio, drop_path)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_classes = tokens.shape[1]
        joint = torch.cat([tokens, features], dim=1)
        joint = self.ffn1(self.cross_attn(joint, joint))
        return joint[:, :num_classes], joint[:, num_classes:]


class PointWiseExtractionBlock(nn.Module):
    """PWE: a point-wise (1x1) interaction of tokens and features together, FFN, split
    (``ffn_features``: as in :class:`SelfSliceExtractionBlock`)."""

    def __init__(self, feature_channels: int, num_classes: int, expand_ratio: int, drop_rate: float,
                 attn_drop_rate: float, drop_path: float, ffn_features: bool) -> None:
        super().__init__()
        channels = num_classes + feature_channels
        self.attn = PointwiseInteraction(channels, drop_rate, drop_path)
        self.ffn1 = ConvFFN(channels, expand_ratio, drop_path)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_classes = tokens.shape[1]
        joint = self.ffn1(self.attn(torch.cat([tokens, features], dim=1)))
        return joint[:, :num_classes], joint[:, num_classes:]


BLOCK_TYPES = {
    "CSE": CrossSliceExtractionBlock,
    "SSE": SelfSliceExtractionBlock,
    "PWE": PointWiseExtractionBlock,
}


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv2(GELU(LN(conv1(GELU(LN(x))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(channels, eps=_PROJECTION_NORM_EPS)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = LayerNorm2d(channels, eps=_PROJECTION_NORM_EPS)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K, h, w] -> [B, K, h, w]."""
        return x + self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))


def check_crop_sizes(cfg: CfgNode) -> None:
    """StructToken's recipe states its training size in up to four keys (the structure-token grid,
    the ViT's position grid, the training crop, the sliding window); one that disagrees would
    silently resample tokens or position embeddings at every step.

    Raises:
        ConfigError: naming every key and its size, when they are not all the same.
    """
    sizes = {"MODEL.STRUCT_TOKEN.IMAGE_SIZE": cfg.MODEL.STRUCT_TOKEN.IMAGE_SIZE}
    if cfg.MODEL.BACKBONE.NAME == "D2VisionTransformer":
        sizes["MODEL.VIT.IMG_SIZE"] = cfg.MODEL.VIT.IMG_SIZE
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute":
        sizes["INPUT.CROP.SIZE"] = cfg.INPUT.CROP.SIZE
    if cfg.TEST.SLIDING_WINDOW.ENABLED:
        sizes["TEST.SLIDING_WINDOW.CROP_SIZE"] = cfg.TEST.SLIDING_WINDOW.CROP_SIZE
    pairs = {key: tuple(size) if isinstance(size, (list, tuple)) else (size, size) for key, size in sizes.items()}
    if len(set(pairs.values())) > 1:
        listed = ", ".join(f"{key} {list(size)}" for key, size in pairs.items())
        raise ConfigError(f"StructToken trains and tests at one size, but the config gives {listed}: set them all alike.")


@SEM_SEG_HEADS_REGISTRY.register()
class StructTokenHead(nn.Module):
    """StructToken head for detectron2's ``SemanticSegmentor``.

    ``forward(features, targets)`` returns, in training, ``(None, {"loss_sem_seg": ...})``: the
    cross-entropy of the stride-s logits upsampled (bilinear) to the targets' size; in
    inference, ``([B, K, s h, s w] logits upsampled to the padded image size, {})``.
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_feature: str,
        block_type: str = "CSE",
        channels: Optional[int] = None,
        num_layers: int = 4,
        token_size: tuple[int, int] = (32, 32),
        expand_ratio: int = 4,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        interpolate_mode: str = "bicubic",
        ignore_value: int = 255,
        loss_weight: float = 1.0,
    ) -> None:
        """
        Args:
            input_shape: the backbone's output shapes.
            num_classes: K, one structure token map per class.
            in_feature: the backbone output to read (the ViT's ``"last_feat"``).
            block_type: ``"CSE"``, ``"SSE"`` or ``"PWE"``.
            channels: C, the width the features are projected to (``dec_proj``); None: the
                input's width, as the official configs set it.
            num_layers: interaction blocks.
            token_size: (h, w) of the learnt token maps (the training crop / stride); they are
                resized (``interpolate_mode``) to other feature sizes.
            expand_ratio: the FFNs' hidden width over their input width.
            drop_rate: dropout on the interaction outputs; attn_drop_rate: on attention weights.
            drop_path_rate: stochastic depth of the last block, linear from 0 over the blocks.
            ignore_value: target value without loss.
            loss_weight: weight of the cross-entropy.
        """
        super().__init__()
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"MODEL.STRUCT_TOKEN.BLOCK must be one of {sorted(BLOCK_TYPES)}, got {block_type!r}")
        if in_feature not in input_shape:
            raise ValueError(
                f"MODEL.STRUCT_TOKEN.IN_FEATURE {in_feature!r} is not a backbone output ({sorted(input_shape)})"
            )
        in_channels = input_shape[in_feature].channels
        channels = channels or in_channels
        self.in_feature = in_feature
        self.common_stride = input_shape[in_feature].stride
        self.token_size = tuple(token_size)
        self.interpolate_mode = interpolate_mode
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.kernels = nn.Parameter(torch.empty(1, num_classes, *self.token_size))
        drop_path_rates = torch.linspace(0, drop_path_rate, num_layers).tolist()
        block = BLOCK_TYPES[block_type]
        self.layers = nn.ModuleList(
            # CSE's last block skips the features' FFN: nothing reads the features after it.
            block(channels, num_classes, expand_ratio, drop_rate, attn_drop_rate, rate, i != num_layers - 1)
            for i, rate in enumerate(drop_path_rates)
        )
        self.dec_proj = nn.Conv2d(in_channels, channels, 1)
        self.residual_block = ResBlock(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.kernels, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict:
        check_crop_sizes(cfg)
        st = cfg.MODEL.STRUCT_TOKEN
        in_feature = st.IN_FEATURE
        stride = input_shape[in_feature].stride if in_feature in input_shape else 1
        height, width = st.IMAGE_SIZE
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "in_feature": in_feature,
            "block_type": st.BLOCK,
            "channels": st.CHANNELS,
            "num_layers": st.NUM_LAYERS,
            "token_size": (height // stride, width // stride),
            "expand_ratio": st.MLP_RATIO,
            "drop_rate": st.DROP_RATE,
            "attn_drop_rate": st.ATTN_DROP_RATE,
            "drop_path_rate": st.DROP_PATH_RATE,
            "interpolate_mode": st.INTERPOLATE_MODE,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
        }

    def layers_forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Backbone features -> [B, K, h, w] class logits at the feature's stride."""
        feature_map = self.dec_proj(features[self.in_feature])
        size = tuple(feature_map.shape[-2:])
        tokens = self.kernels
        if size != self.token_size:
            # The official code aligns corners when the token grid has an odd side.
            odd = any(side % 2 for side in self.token_size)
            align_corners = odd if self.interpolate_mode in ("bilinear", "bicubic") else None
            tokens = F.interpolate(tokens, size=size, mode=self.interpolate_mode, align_corners=align_corners)
        tokens = tokens.expand(feature_map.shape[0], -1, -1, -1)
        for layer in self.layers:
            tokens, feature_map = layer(tokens, feature_map)
        return self.residual_block(tokens)

    def forward(
        self, features: dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
    ) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """
        Args:
            features: backbone outputs; ``features[in_feature]`` is [B, C_in, h, w].
            targets: [B, H, W] int64 class ids (``ignore_value`` = no loss), training only.
        """
        logits = self.layers_forward(features)
        if self.training:
            return None, self.losses(logits, targets)
        size = (logits.shape[-2] * self.common_stride, logits.shape[-1] * self.common_stride)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False), {}

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of ``logits`` [B, K, h, w] upsampled to ``targets`` [B, H, W]."""
        logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        if not (targets != self.ignore_value).any():
            # A batch without a labelled pixel teaches nothing; cross_entropy's mean would be NaN.
            return {"loss_sem_seg": logits.sum() * 0.0}
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_value)
        return {"loss_sem_seg": loss * self.loss_weight}
