"""``MSDeformAttn``: the multi-scale deformable attention layer of Deformable DETR / Mask2Former."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .functions import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021).

    Every query predicts, per head, level and point, a sampling offset around its reference
    point and an attention weight (softmax over the levels x points of a head); the output is
    the weighted sum of the sampled values, projected back to ``d_model``.

    Parameter names and initialisation follow the official implementation, so its checkpoints
    (and Mask2Former's pixel decoder weights) load unchanged.
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4
    ) -> None:
        """
        Args:
            d_model: channels of queries, inputs and output; must be divisible by n_heads.
            n_levels: feature levels sampled.
            n_heads: attention heads, each of d_model // n_heads channels.
            n_points: sampling points per head and level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start as a fixed pattern independent of the query: head h looks in direction
        # 2*pi*h/H (scaled so that the larger of |cos|, |sin| is 1), point k at distance k + 1.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        # [H, L, P, 2], the layout of the Linear's output.
        offset_grid = directions[:, None, None, :] * distances[None, None, :, None]
        offset_grid = offset_grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offset_grid.reshape(-1))
        # Uniform attention over all levels and points at the start.
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C], C = d_model.
            reference_points: [N, Lq, L, 2], (x, y) in [0, 1] with (0, 0) the top-left corner of
                each level; or [N, Lq, L, 4], boxes (cx, cy, w, h) whose size scales the offsets.
            input_flatten: [N, S, C], the pixels of all levels, flattened level after level.
            input_spatial_shapes: [L, 2] int64, (height, width) of each level.
            input_level_start_index: [L] int64, index in S of each level's first pixel.
            input_padding_mask: [N, S] bool, True at padding pixels (their values are zeroed).

        Returns:
            [N, Lq, C].
        """
        batch, num_queries, _ = query.shape
        _, num_values, _ = input_flatten.shape
        if input_spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(
                f"MSDeformAttn was built for {self.n_levels} levels, got spatial shapes of "
                f"{input_spatial_shapes.shape[0]}"
            )
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "reference_points must be [N, Lq, L, 2] (points) or [N, Lq, L, 4] (boxes), got "
                f"shape {tuple(reference_points.shape)}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)

        sampling_offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = F.softmax(attention_weights, dim=-1).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points
        )

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (width, height).
            offset_normalizer = input_spatial_shapes.flip(-1).to(sampling_offsets.dtype)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        else:
            # Offsets are fractions of the box half-size, spread over the points.
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )

        output = ms_deform_attn(
            value,
            input_spatial_shapes,
            input_level_start_index,
            sampling_locations.to(value.dtype),
            attention_weights,
        )
        return self.output_proj(output)
