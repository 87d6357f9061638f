"""kMaX-DeepLab's auxiliary semantic head, trained on the backbone features beside the kMaX
decoder: Panoptic-DeepLab's ASPP decoder (COCO / ADE20K) or a light head (Cityscapes)."""
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ConvBN, tf_align_corners, trunc_normal_tf_

__all__ = ["ASPP", "SemanticPredictor", "light_semantic_head"]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch,
    concatenated, projected by 1x1 + BN + GELU, dropout 0.1."""

    def __init__(self, in_channels: int, output_channels: int, atrous_rates: Sequence[int], norm: str = "SyncBN"):
        super().__init__()
        if len(atrous_rates) != 3:
            raise ValueError(f"ASPP takes 3 atrous rates, got {list(atrous_rates)}")
        self._aspp_conv0 = ConvBN(in_channels, output_channels, 1, norm=norm, act="gelu")
        for index, rate in enumerate(atrous_rates, start=1):
            self.add_module(
                f"_aspp_conv{index}",
                ConvBN(in_channels, output_channels, 3, dilation=rate, padding=rate, norm=norm, act="gelu"),
            )
        self._avg_pool = nn.AdaptiveAvgPool2d(1)
        self._aspp_pool = ConvBN(in_channels, output_channels, 1, norm=norm, act="gelu")
        self._proj_conv_bn_act = ConvBN(5 * output_channels, output_channels, 1, norm=norm, act="gelu")
        self._proj_drop = nn.Dropout(p=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, output_channels, H, W]."""
        # The image-pooling branch normalises its [B, C, 1, 1] map after broadcasting it to
        # H x W: the batch statistics are the same (every value repeated H x W times), but a
        # single image per process no longer leaves BN one value per channel, which PyTorch
        # rejects in training (the official port fails there at batch 1). Upsampling a 1 x 1 map
        # is a broadcast, and the 1x1 conv commutes with it, so it runs on the pooled map.
        pooled = self._aspp_pool.conv(self._avg_pool(x)).expand(-1, -1, *x.shape[-2:])
        pooled = self._aspp_pool.act(self._aspp_pool.norm(pooled))
        branches = [self._aspp_conv0(x), self._aspp_conv1(x), self._aspp_conv2(x), self._aspp_conv3(x), pooled]
        return self._proj_drop(self._proj_conv_bn_act(torch.cat(branches, dim=1)))


class SemanticPredictor(nn.Module):
    """Panoptic-DeepLab's single decoder and head: ASPP on stride 32, fused with projected
    stride-8 (64 ch) and stride-4 (32 ch) features by depthwise 5x5 + 1x1 convolutions, then a
    depthwise + 1x1 head and a 1x1 classifier. Output at stride 4."""

    def __init__(
        self,
        in_channels: int,
        os8_channels: int,
        os4_channels: int,
        num_classes: int,
        norm: str = "SyncBN",
        aspp_channels: int = 256,
        atrous_rates: Sequence[int] = (6, 12, 18),
    ):
        super().__init__()
        self._aspp = ASPP(in_channels, aspp_channels, atrous_rates, norm=norm)
        for stride, low_channels in ((8, 64), (4, 32)):
            in_low = os8_channels if stride == 8 else os4_channels
            fused = aspp_channels + low_channels
            self.add_module(f"_low_level_projection_os{stride}", ConvBN(in_low, low_channels, 1, norm=norm, act="gelu"))
            self.add_module(
                f"_low_level_fusion_os{stride}_conv0_bn_act",
                ConvBN(fused, fused, 5, padding=2, groups=fused, norm=norm, act="gelu", conv_init="xavier_uniform"),
            )
            self.add_module(
                f"_low_level_fusion_os{stride}_conv1_bn_act", ConvBN(fused, aspp_channels, 1, norm=norm, act="gelu")
            )
        self.conv_block_0 = ConvBN(
            aspp_channels, aspp_channels, 5, padding=2, groups=aspp_channels, norm=norm, act="gelu",
            conv_init="xavier_uniform",
        )
        self.conv_block_1 = ConvBN(aspp_channels, aspp_channels, 1, norm=norm, act="gelu")
        self.final_conv = ConvBN(aspp_channels, num_classes, 1, bias=True, norm="")
        trunc_normal_tf_(self.final_conv.conv.weight, std=0.01)

    def _fuse(self, x: torch.Tensor, low_features: torch.Tensor, stride: int) -> torch.Tensor:
        low = getattr(self, f"_low_level_projection_os{stride}")(low_features)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=tf_align_corners(x.shape))
        x = torch.cat([x, low], dim=1)
        x = getattr(self, f"_low_level_fusion_os{stride}_conv0_bn_act")(x)
        return getattr(self, f"_low_level_fusion_os{stride}_conv1_bn_act")(x)

    def forward(self, x: torch.Tensor, low_features_os8: torch.Tensor, low_features_os4: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H/32, W/32]; low features at strides 8 and 4 -> [B, num_classes, H/4, W/4]."""
        x = self._fuse(self._aspp(x), low_features_os8, 8)
        x = self._fuse(x, low_features_os4, 4)
        return self.final_conv(self.conv_block_1(self.conv_block_0(x)))


def light_semantic_head(in_channels: int, num_classes: int, norm: str) -> nn.Sequential:
    """Cityscapes' head: depthwise 5x5 + 1x1 (256) + classifier on stride-32 features."""
    head = nn.Sequential(
        ConvBN(in_channels, in_channels, 5, padding=2, groups=in_channels, norm=norm, act="gelu", conv_init="xavier_uniform"),
        ConvBN(in_channels, 256, 1, norm=norm, act="gelu"),
        ConvBN(256, num_classes, 1, bias=True, norm=""),
    )
    trunc_normal_tf_(head[2].conv.weight, std=0.01)
    return head
