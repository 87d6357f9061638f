// Multi-scale deformable attention on CUDA GPUs.
//
// Forward: one thread per output element (n, q, h, d). Neighbouring threads handle neighbouring
// channels of one (pixel, head), so each bilinear corner is one coalesced read of D numbers.
//
// Backward: one warp per (n, q, h), lanes striding over the D channels. Each lane scatters its
// channels into grad_value with atomics (different queries may hit the same pixel); the
// per-sample dot products that give the location and weight gradients are summed across the
// warp with shuffles. Half and bfloat16 inputs accumulate grad_value in a float32 buffer: adding
// many small contributions in half precision would lose most of them.
#include "cuda/ms_deform_attn_cuda.h"

#include "bilinear_footprint.h"
#include "ms_deform_attn_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace kmax_m2f {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
// Grid-stride loops cover any size; more blocks than this only add scheduling overhead.
constexpr int64_t kMaxBlocks = 65535;

int64_t blocks_for(int64_t threads_needed) {
  return std::max<int64_t>(
      1, std::min<int64_t>((threads_needed + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks));
}

template <typename scalar_t>
__global__ void ms_deform_attn_forward_kernel(MSDeformAttnSizes s,
                                              const scalar_t* __restrict__ value,
                                              const int64_t* __restrict__ spatial_shapes,
                                              const int64_t* __restrict__ level_start_index,
                                              const scalar_t* __restrict__ sampling_locations,
                                              const scalar_t* __restrict__ attention_weights,
                                              scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = s.num_heads * s.channels;
  const int64_t samples = s.num_levels * s.num_points;
  const int64_t total = s.batch * s.num_queries * s.num_heads * s.channels;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       index < total; index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // output is [N, Lq, H, D] flattened: index = query_head * D + channel.
    const int64_t channel = index % s.channels;
    const int64_t query_head = index / s.channels;
    const int64_t head = query_head % s.num_heads;
    const int64_t batch = query_head / (s.num_heads * s.num_queries);
    const scalar_t* locations = sampling_locations + query_head * samples * 2;
    const scalar_t* weights = attention_weights + query_head * samples;
    const scalar_t* value_channel =
        value + batch * s.num_values * pixel_stride + head * s.channels + channel;

    acc_t acc = 0;
    BilinearFootprint<acc_t> footprint;
    for (int64_t level = 0; level < s.num_levels; ++level) {
      const int64_t height = spatial_shapes[2 * level];
      const int64_t width = spatial_shapes[2 * level + 1];
      const int64_t level_start = level_start_index[level];
      for (int64_t point = 0; point < s.num_points; ++point) {
        const int64_t sample = level * s.num_points + point;
        if (!locate_bilinear_footprint(static_cast<acc_t>(locations[2 * sample]),
                                       static_cast<acc_t>(locations[2 * sample + 1]), height,
                                       width, level_start, pixel_stride, footprint)) {
          continue;
        }
        const acc_t attention = static_cast<acc_t>(weights[sample]);
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (footprint.inside[corner]) {
            acc += attention * footprint.weight[corner] *
                   static_cast<acc_t>(value_channel[footprint.offset[corner]]);
          }
        }
      }
    }
    output[index] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// grad_value_acc has value's shape in the accumulation type (see the file comment).
template <typename scalar_t>
__global__ void ms_deform_attn_backward_kernel(
    MSDeformAttnSizes s,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights,
    const scalar_t* __restrict__ grad_output,
    at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
    scalar_t* __restrict__ grad_sampling_locations,
    scalar_t* __restrict__ grad_attention_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = s.num_heads * s.channels;
  const int64_t samples = s.num_levels * s.num_points;
  const int64_t num_query_heads = s.batch * s.num_queries * s.num_heads;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  // The loop bound is the same for every lane of a warp, as the shuffles below require.
  for (int64_t query_head = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) /
                            kWarpSize;
       query_head < num_query_heads; query_head += warps_in_grid) {
    const int64_t head = query_head % s.num_heads;
    const int64_t batch = query_head / (s.num_heads * s.num_queries);
    const int64_t head_offset = batch * s.num_values * pixel_stride + head * s.channels;
    const scalar_t* value_head = value + head_offset;
    acc_t* grad_value_head = grad_value_acc + head_offset;
    const scalar_t* locations = sampling_locations + query_head * samples * 2;
    const scalar_t* weights = attention_weights + query_head * samples;
    const scalar_t* grad_out = grad_output + query_head * s.channels;
    scalar_t* grad_locations = grad_sampling_locations + query_head * samples * 2;
    scalar_t* grad_weights = grad_attention_weights + query_head * samples;

    BilinearFootprint<acc_t> footprint;
    for (int64_t level = 0; level < s.num_levels; ++level) {
      const int64_t height = spatial_shapes[2 * level];
      const int64_t width = spatial_shapes[2 * level + 1];
      const int64_t level_start = level_start_index[level];
      for (int64_t point = 0; point < s.num_points; ++point) {
        const int64_t sample = level * s.num_points + point;
        if (!locate_bilinear_footprint(static_cast<acc_t>(locations[2 * sample]),
                                       static_cast<acc_t>(locations[2 * sample + 1]), height,
                                       width, level_start, pixel_stride, footprint)) {
          if (lane == 0) {
            grad_locations[2 * sample] = scalar_t(0);
            grad_locations[2 * sample + 1] = scalar_t(0);
            grad_weights[sample] = scalar_t(0);
          }
          continue;
        }
        const acc_t attention = static_cast<acc_t>(weights[sample]);
        acc_t corner_dot[4] = {0, 0, 0, 0};
        for (int64_t channel = lane; channel < s.channels; channel += kWarpSize) {
          const acc_t grad = static_cast<acc_t>(grad_out[channel]);
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            if (footprint.inside[corner]) {
              const int64_t element = footprint.offset[corner] + channel;
              corner_dot[corner] += grad * static_cast<acc_t>(value_head[element]);
              gpuAtomicAdd(grad_value_head + element, attention * footprint.weight[corner] * grad);
            }
          }
        }
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          corner_dot[corner] = warp_sum(corner_dot[corner]);
        }
        if (lane == 0) {
          const SampleGradients<acc_t> gradients =
              sample_gradients(footprint, corner_dot, attention, height, width);
          grad_weights[sample] = static_cast<scalar_t>(gradients.attention_weight);
          grad_locations[2 * sample] = static_cast<scalar_t>(gradients.location_x);
          grad_locations[2 * sample + 1] = static_cast<scalar_t>(gradients.location_y);
        }
      }
    }
  }
}

// The checks that need no device sync; the level sizes against S are checked by the Python
// wrapper (kmax_m2f.layers.ms_deform_attn.functions), which reads them on the host anyway.
MSDeformAttnSizes check_cuda_inputs(const at::Tensor& value,
                                    const at::Tensor& spatial_shapes,
                                    const at::Tensor& level_start_index,
                                    const at::Tensor& sampling_locations,
                                    const at::Tensor& attention_weights) {
  const MSDeformAttnSizes sizes = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_cuda: inputs must be CUDA tensors");
  return sizes;
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value,
                                       const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MSDeformAttnSizes s = check_cuda_inputs(value, spatial_shapes, level_start_index,
                                                sampling_locations, attention_weights);
  const at::cuda::OptionalCUDAGuard device_guard(value.device());
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  at::Tensor output =
      at::empty({s.batch, s.num_queries, s.num_heads * s.channels}, value.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
      "ms_deform_attn_cuda_forward", [&] {
        ms_deform_attn_forward_kernel<scalar_t>
            <<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
                s, value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
                starts_c.const_data_ptr<int64_t>(), locations_c.const_data_ptr<scalar_t>(),
                weights_c.const_data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output) {
  const MSDeformAttnSizes s = check_cuda_inputs(value, spatial_shapes, level_start_index,
                                                sampling_locations, attention_weights);
  check_grad_output(grad_output, value, s);
  const at::cuda::OptionalCUDAGuard device_guard(value.device());
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  const at::Tensor grad_output_c = grad_output.contiguous();

  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value_c.sizes(), value.options().dtype(acc_type));
  // Every element of these two is written by the kernel.
  at::Tensor grad_locations = at::empty_like(locations_c);
  at::Tensor grad_weights = at::empty_like(weights_c);
  const int64_t num_query_heads = s.batch * s.num_queries * s.num_heads;
  if (num_query_heads > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
        "ms_deform_attn_cuda_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          ms_deform_attn_backward_kernel<scalar_t>
              <<<blocks_for(num_query_heads * kWarpSize), kThreadsPerBlock, 0, stream>>>(
                  s, value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
                  starts_c.const_data_ptr<int64_t>(), locations_c.const_data_ptr<scalar_t>(),
                  weights_c.const_data_ptr<scalar_t>(), grad_output_c.const_data_ptr<scalar_t>(),
                  grad_value_acc.data_ptr<acc_t>(), grad_locations.data_ptr<scalar_t>(),
                  grad_weights.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  // A no-op for float32 / float64, whose accumulation type is their own.
  at::Tensor grad_value = grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace kmax_m2f
