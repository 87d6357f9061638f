"""Pure PyTorch multi-scale deformable attention: ``grid_sample`` once per level.

It defines the op's semantics, serves as the baseline of the native kernels in tests and
benchmarks, and is the last-resort fallback when ``kmax_m2f._C`` is not built. It is slow and
memory-hungry: autograd keeps an [N*H, D, Lq, P] tensor of sampled values per level.
"""

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference"]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``F.grid_sample``.

    Args:
        value: [N, S, H, D], the flattened pixels of all levels, split into H heads of D channels.
        spatial_shapes: [L, 2] int64, (height, width) of each level.
        level_start_index: [L] int64, index in S of each level's first pixel.
        sampling_locations: [N, Lq, H, L, P, 2], (x, y) in [0, 1] (outside reads zeros).
        attention_weights: [N, Lq, H, L, P], weight of each sampled value.

    Returns:
        [N, Lq, H * D]: per query and head, the weighted sum of bilinearly sampled values.
    """
    batch, _, num_heads, channels = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # grid_sample's coordinates are in [-1, 1]; with align_corners=False, -1 and 1 are the outer
    # edges of the border pixels, as 0 and 1 are for the sampling locations.
    sampling_grids = 2 * sampling_locations - 1
    # [N, Lq, H, L, P] -> [N*H, 1, Lq, L, P]
    weights = attention_weights.transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels, num_points
    )
    output = value.new_zeros(batch * num_heads, channels, num_queries)
    levels = zip(spatial_shapes.tolist(), level_start_index.tolist())
    for level, ((height, width), start) in enumerate(levels):
        # [N, H_l*W_l, H, D] -> [N*H, D, H_l, W_l]
        value_level = (
            value[:, start : start + height * width]
            .flatten(2)
            .transpose(1, 2)
            .reshape(batch * num_heads, channels, height, width)
        )
        # [N, Lq, H, P, 2] -> [N*H, Lq, P, 2]
        grid_level = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # [N*H, D, Lq, P]
        sampled = F.grid_sample(
            value_level, grid_level, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        # Accumulating level by level keeps one level's samples alive in the forward pass
        # instead of a stack of all of them.
        output = output + (sampled * weights[:, :, :, level]).sum(-1)
    # [N*H, D, Lq] -> [N, Lq, H*D]
    return output.view(batch, num_heads * channels, num_queries).transpose(1, 2).contiguous()
