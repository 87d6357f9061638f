"""ConvNeXt backbone (Liu et al., "A ConvNet for the 2020s", CVPR 2022), as kMaX-DeepLab uses it.

Module and parameter names follow the official kMaX-DeepLab port (bytedance/kmax-deeplab,
``D2ConvNeXt``), which keeps the ImageNet ConvNeXt layout, so its checkpoints load with no missing
or unexpected keys:

- ``downsample_layers.0.{0,1}``: the stem, a 4x4 / 4 conv then a channels-first LayerNorm;
- ``downsample_layers.{1,2,3}.{0,1}``: channels-first LayerNorm then a 2x2 / 2 conv;
- ``stages.{i}.{j}.{dwconv,norm,pwconv1,pwconv2,gamma}``: the blocks.

There are no per-output norms: the stage outputs are returned as they are (kMaX's pixel decoder
normalises each input itself).

Every downsampling is preceded by zero padding, as in deeplab2's ConvNeXt (3 pixels around the
stem, 1 before the bottom/right of each later downsampling), so a stride-s feature has
ceil(H / s) x ceil(W / s) pixels on any input size: 321 / 161 / 81 / 41 for kMaX's odd 1281 crops,
the sizes its pixel decoder's relative-position tables are built for.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torchvision.ops import StochasticDepth

from ...layers import LayerNorm2d

__all__ = ["ConvNeXt", "ConvNeXtBlock", "D2ConvNeXt"]

# (left, right, top, bottom) zero padding before the stem and before each later downsampling.
_STEM_PADDING = (1, 2, 1, 2)
_DOWNSAMPLE_PADDING = (0, 1, 0, 1)
_LAYER_NORM_EPS = 1e-6


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> Linear (4x) -> GELU -> Linear -> layer scale, added to
    the input through stochastic depth. The pointwise layers are ``nn.Linear`` on channels-last
    tokens, whose weight shapes are the ones the checkpoints hold."""

    def __init__(
        self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6
    ) -> None:
        """
        Args:
            dim: channels.
            drop_path: probability of dropping the residual branch of a sample (training only).
            layer_scale_init_value: initial value of the per-channel scale ``gamma`` of the
                branch; <= 0 disables it (no ``gamma`` parameter).
        """
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma = None
        # Per-sample stochastic depth ("row"), identity in eval mode; same as timm's DropPath.
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        branch = self.dwconv(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        branch = self.pwconv2(self.act(self.pwconv1(self.norm(branch))))
        if self.gamma is not None:
            branch = branch * self.gamma
        return x + self.drop_path(branch.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt feature extractor: a stride-4 stem, then four stages of ConvNeXt blocks at
    strides 4, 8, 16, 32 with ``dims[i]`` channels, separated by 2x2 / 2 downsampling."""

    def __init__(
        self,
        *,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
    ) -> None:
        """
        Args:
            depths, dims: blocks and channels of each of the four stages
                (T: [3, 3, 9, 3] / [96, 192, 384, 768]; S: [3, 3, 27, 3] / same dims;
                B: [3, 3, 27, 3] / [128, 256, 512, 1024]; L: [3, 3, 27, 3] / [192, 384, 768, 1536]).
            drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over all
                blocks of all stages.
            layer_scale_init_value: initial layer scale of every block (<= 0: none).
        """
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(
                f"ConvNeXt has 4 stages: got DEPTHS {list(depths)} and DIMS {list(dims)}"
            )
        self.num_features = list(dims)

        stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0])
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)
                )
            )

        # Python floats, so the schedule is computable under a `torch.device("meta")` context.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        start = 0
        for depth, dim in zip(depths, dims):
            self.stages.append(
                nn.Sequential(
                    *(
                        ConvNeXtBlock(dim, rates[start + j], layer_scale_init_value)
                        for j in range(depth)
                    )
                )
            )
            start += depth
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            x: [B, in_chans, H, W], any H and W.
        Returns:
            ``stem``: [B, dims[0], ceil(H / 4), ceil(W / 4)], the stem's output before the blocks;
            ``res{i + 2}``: [B, dims[i], ceil(H / s), ceil(W / s)] with s = 4 * 2**i.
        """
        outputs = {}
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            # Pad first, as the official model does: for the later downsamplings that is before
            # their LayerNorm, so the padded pixels enter the conv as the norm's bias, not zeros.
            x = downsample(F.pad(x, _STEM_PADDING if i == 0 else _DOWNSAMPLE_PADDING))
            if i == 0:
                outputs["stem"] = x
            x = stage(x)
            outputs[f"res{i + 2}"] = x
        return outputs


def _init_weights(module: nn.Module) -> None:
    """ConvNeXt's initialisation: truncated normal (std 0.02) conv and Linear weights, zero
    biases. It matters only when training without pretrained weights."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


@BACKBONE_REGISTRY.register()
class D2ConvNeXt(ConvNeXt, Backbone):
    """:class:`ConvNeXt` as a detectron2 backbone built from ``MODEL.CONVNEXT.*``, registered
    under the official port's name.

    Its parameters sit at the top level of the module (``backbone.stages...`` in a
    meta-architecture), as in the official model. Inputs are expected already normalised by the
    meta-architecture.
    """

    @configurable
    def __init__(
        self, *, out_indices: Sequence[int], out_features: Sequence[str], **convnext_kwargs
    ) -> None:
        """
        Args:
            out_indices: stages (0..3) whose output may be returned, as ``res{index + 2}``.
            out_features: the names to return: among those of ``out_indices``, and ``stem``
                (the stem's output, stride 4; the official port declares stride 2 for it).
            convnext_kwargs: arguments of :class:`ConvNeXt`.
        """
        super().__init__(**convnext_kwargs)
        bad_indices = [i for i in out_indices if i not in range(4)]
        if bad_indices:
            raise ValueError(f"MODEL.CONVNEXT.OUT_INDICES: {bad_indices} not among 0..3")
        names = ["stem"] + [f"res{i + 2}" for i in sorted(out_indices)]
        unknown = [name for name in out_features if name not in names]
        if unknown:
            raise ValueError(
                f"MODEL.CONVNEXT.OUT_FEATURES: {unknown} not among {names} "
                f"(allowed by OUT_INDICES {list(out_indices)})"
            )
        self._out_features = list(out_features)
        self._out_feature_strides = {"stem": 4, **{f"res{i + 2}": 4 * 2**i for i in range(4)}}
        self._out_feature_channels = {
            "stem": self.num_features[0],
            **{f"res{i + 2}": channels for i, channels in enumerate(self.num_features)},
        }

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> dict:
        convnext = cfg.MODEL.CONVNEXT
        return {
            "out_indices": convnext.OUT_INDICES,
            "out_features": convnext.OUT_FEATURES,
            "in_chans": convnext.IN_CHANNELS,
            "depths": convnext.DEPTHS,
            "dims": convnext.DIMS,
            "drop_path_rate": convnext.DROP_PATH_RATE,
            "layer_scale_init_value": convnext.LSIT,
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            x: [B, C, H, W] normalised images, any H and W.
        Returns:
            The features named in ``out_features``, [B, C_i, ceil(H / s_i), ceil(W / s_i)].
        """
        if x.dim() != 4:
            raise ValueError(f"D2ConvNeXt takes [B, C, H, W] images, got {tuple(x.shape)}")
        features = super().forward(x)
        return {name: features[name] for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        # Any size works (the padding above); kMaX pads its inputs to INPUT.IMAGE_SIZE anyway.
        return 0
