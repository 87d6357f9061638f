"""Sine position encodings of 2-D feature maps (DETR / Mask2Former)."""
import math
from typing import Optional

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of each pixel's (y, x) position.

    Half of the ``2 * num_pos_feats`` output channels encode y, half x. With ``normalize`` the
    positions are first scaled to [0, scale] so the encoding does not depend on the map's size.
    """

    def __init__(
        self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: [B, C, H, W]; only its shape, device and dtype are used.
            mask: [B, H, W] bool, True at padding pixels (which then do not advance positions).

        Returns:
            [B, 2 * num_pos_feats, H, W].
        """
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        valid = ~mask
        y_position = valid.cumsum(1, dtype=torch.float32)
        x_position = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            # Positions 1..extent of the valid region, scaled to (0, scale].
            y_position = y_position / (y_position[:, -1:, :] + eps) * self.scale
            x_position = x_position / (x_position[:, :, -1:] + eps) * self.scale

        channel = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        wavelengths = self.temperature ** (2 * torch.div(channel, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_position[:, :, :, None] / wavelengths
        pos_y = y_position[:, :, :, None] / wavelengths
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)
