"""Depthwise 2D convolution laid out for PyTorch's CPU kernels (kMaX-DeepLab's heads, ConvNeXt)."""
import torch
from torch import nn


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups == in_channels``: same parameters, same results, but on CPU it
    runs channels-last and in float32 even under bfloat16 autocast.

    oneDNN's CPU backward pass of a depthwise convolution is the slow part, and it depends on the
    layout and dtype (5x5, [8, 288, 64, 64], 2 cores, forward + input + weight gradients):
    NCHW float32 31 + 70 + 135 ms, channels-last float32 15 + 32 + 75 ms, channels-last bfloat16
    6 + 22 + 290 ms (BENCHMARKS.md). kMaX-DeepLab's semantic and pixel heads are built from these
    convolutions at strides 4 and 8. The output stays channels-last (later layers accept either
    layout). CUDA inputs are left as they are.
    """

    def __init__(self, channels: int, kernel_size: int, **kwargs) -> None:
        """``channels`` in and out, one filter per channel; ``kwargs`` as ``nn.Conv2d``'s
        (``stride``, ``padding``, ``dilation``, ``bias``, ...)."""
        super().__init__(channels, channels, kernel_size, groups=channels, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H', W'] (float32 on CPU under autocast)."""
        if x.device.type != "cpu":
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        if not torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float())
