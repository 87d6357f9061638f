// Multi-scale deformable attention: native CPU kernel (float32 and float64).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace kmax_m2f {

// value [N, S, H, D], spatial_shapes [L, 2] (int64, (height, width) per level),
// level_start_index [L] (int64), sampling_locations [N, Lq, H, L, P, 2] ((x, y) in [0, 1]),
// attention_weights [N, Lq, H, L, P]  ->  output [N, Lq, H * D].
at::Tensor ms_deform_attn_cpu_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// grad_output [N, Lq, H * D]  ->  {grad_value, grad_sampling_locations, grad_attention_weights},
// shaped like value, sampling_locations and attention_weights.
std::vector<at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

}  // namespace kmax_m2f
