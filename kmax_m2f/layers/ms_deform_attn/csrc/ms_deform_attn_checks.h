// Argument checks shared by the CPU and CUDA kernels. The Python wrapper validates first with
// friendlier messages; these keep the raw entry points (kmax_m2f._C) from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace kmax_m2f {

// Sizes of one multi-scale deformable attention call.
struct MSDeformAttnSizes {
  int64_t batch;          // N
  int64_t num_values;     // S: pixels of all levels together
  int64_t num_heads;      // H
  int64_t channels;       // D: channels per head
  int64_t num_queries;    // Lq
  int64_t num_levels;     // L
  int64_t num_points;     // P: sampling points per head and level
};

inline MSDeformAttnSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, H, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [N, Lq, H, L, P, 2], got ",
              sampling_locations.sizes());
  const MSDeformAttnSizes sizes{value.size(0),
                                value.size(1),
                                value.size(2),
                                value.size(3),
                                sampling_locations.size(1),
                                sampling_locations.size(3),
                                sampling_locations.size(4)};
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == sizes.num_levels &&
                  spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2] with L = ", sizes.num_levels,
              ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == sizes.num_levels,
              "ms_deform_attn: level_start_index must be [L] with L = ", sizes.num_levels,
              ", got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.size(0) == sizes.batch &&
                  sampling_locations.size(2) == sizes.num_heads,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match value ", value.sizes(), " in N or H");
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.size(0) == sizes.batch &&
                  attention_weights.size(1) == sizes.num_queries &&
                  attention_weights.size(2) == sizes.num_heads &&
                  attention_weights.size(3) == sizes.num_levels &&
                  attention_weights.size(4) == sizes.num_points,
              "ms_deform_attn: attention_weights must be [N, Lq, H, L, P] = [", sizes.batch, ", ",
              sizes.num_queries, ", ", sizes.num_heads, ", ", sizes.num_levels, ", ",
              sizes.num_points, "], got ", attention_weights.sizes());
  TORCH_CHECK(value.scalar_type() == sampling_locations.scalar_type() &&
                  value.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a "
              "dtype, got ", value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_locations.device() == device && attention_weights.device() == device,
              "ms_deform_attn: all inputs must be on ", device);
  return sizes;
}

// grad_output of the backward pass: [N, Lq, H * D], value's dtype and device.
inline void check_grad_output(const at::Tensor& grad_output,
                              const at::Tensor& value,
                              const MSDeformAttnSizes& sizes) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == sizes.batch &&
                  grad_output.size(1) == sizes.num_queries &&
                  grad_output.size(2) == sizes.num_heads * sizes.channels,
              "ms_deform_attn_backward: grad_output must be [N, Lq, H * D] = [", sizes.batch, ", ",
              sizes.num_queries, ", ", sizes.num_heads * sizes.channels, "], got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device(),
              "ms_deform_attn_backward: grad_output must be a ", value.scalar_type(),
              " tensor on ", value.device());
}

// Levels are read straight from spatial_shapes / level_start_index by the kernels: a level that
// does not fit in value would be read out of bounds. Needs the two index tensors on the CPU.
inline void check_levels_fit(const at::Tensor& spatial_shapes_cpu,
                             const at::Tensor& level_start_index_cpu,
                             const MSDeformAttnSizes& sizes) {
  const int64_t* shapes = spatial_shapes_cpu.data_ptr<int64_t>();
  const int64_t* starts = level_start_index_cpu.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t level = 0; level < sizes.num_levels; ++level) {
    const int64_t height = shapes[2 * level], width = shapes[2 * level + 1];
    TORCH_CHECK(height > 0 && width > 0, "ms_deform_attn: level ", level, " has shape (",
                height, ", ", width, ")");
    TORCH_CHECK(starts[level] == total, "ms_deform_attn: level_start_index[", level, "] = ",
                starts[level], " but the levels before it hold ", total, " pixels");
    total += height * width;
  }
  TORCH_CHECK(total == sizes.num_values, "ms_deform_attn: spatial_shapes cover ", total,
              " pixels but value has S = ", sizes.num_values);
}

}  // namespace kmax_m2f
