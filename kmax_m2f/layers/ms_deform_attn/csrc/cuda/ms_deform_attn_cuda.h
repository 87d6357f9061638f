// Multi-scale deformable attention: CUDA kernel (float32, float64, and float16 / bfloat16
// inputs with float32 accumulation). Same contract as the CPU kernel (cpu/ms_deform_attn_cpu.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace kmax_m2f {

at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

}  // namespace kmax_m2f
