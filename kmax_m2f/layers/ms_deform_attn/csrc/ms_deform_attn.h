// Multi-scale deformable attention: one entry point per pass, dispatched on the inputs' device.
#pragma once

#include "cpu/ms_deform_attn_cpu.h"

#ifdef WITH_CUDA
#include "cuda/ms_deform_attn_cuda.h"
#endif

#include <c10/util/Exception.h>

#include <vector>

namespace kmax_m2f {

// value [N, S, H, D], spatial_shapes [L, 2] (int64), level_start_index [L] (int64),
// sampling_locations [N, Lq, H, L, P, 2] in [0, 1], attention_weights [N, Lq, H, L, P]
//   -> output [N, Lq, H * D].
inline at::Tensor ms_deform_attn_forward(const at::Tensor& value,
                                         const at::Tensor& spatial_shapes,
                                         const at::Tensor& level_start_index,
                                         const at::Tensor& sampling_locations,
                                         const at::Tensor& attention_weights) {
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights);
#else
    TORCH_CHECK(false, "kmax_m2f._C was built without CUDA: rebuild it where nvcc is found "
                       "(or with FORCE_CUDA=1) to run MSDeformAttn on the GPU");
#endif
  }
  return ms_deform_attn_cpu_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights);
}

// grad_output [N, Lq, H * D] -> {grad_value, grad_sampling_locations, grad_attention_weights}.
inline std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value,
                                                       const at::Tensor& spatial_shapes,
                                                       const at::Tensor& level_start_index,
                                                       const at::Tensor& sampling_locations,
                                                       const at::Tensor& attention_weights,
                                                       const at::Tensor& grad_output) {
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights, grad_output);
#else
    TORCH_CHECK(false, "kmax_m2f._C was built without CUDA: rebuild it where nvcc is found "
                       "(or with FORCE_CUDA=1) to run MSDeformAttn on the GPU");
#endif
  }
  return ms_deform_attn_cpu_backward(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights, grad_output);
}

}  // namespace kmax_m2f
