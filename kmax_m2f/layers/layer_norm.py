"""LayerNorm over the channels of NCHW maps (ConvNeXt, kMaX-DeepLab)."""
import torch
from torch import nn
from torch.nn import functional as F

from .precision import at_least_float32


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (parameters ``weight``, ``bias`` of
    shape [C]).

    A subclass of ``nn.LayerNorm`` so that the optimizer's parameter groups treat it as a norm
    (no weight decay). Half-precision inputs are normalised in float32 and returned as float32,
    as the official one does under autocast: half-precision statistics over many channels lose
    accuracy, and keeping its dtypes keeps the AMP numerics the same.

    The output keeps the input's memory format (NCHW or channels-last).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W], float32 for half-precision inputs."""
        x = at_least_float32(x)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # Channels-last memory holds each pixel's channels side by side: the fused kernel of
            # F.layer_norm reads them in place (no copy), in one pass instead of the five below.
            channels_last = x.permute(0, 2, 3, 1)
            return F.layer_norm(channels_last, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
        # Reducing over dim 1 directly keeps the NCHW layout (a permute to channels-last
        # and back would hand the next layers a non-contiguous tensor).
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]
