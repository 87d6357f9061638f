// Multi-scale deformable attention on the CPU.
//
// Layout facts the kernels are built around:
// - value is [N, S, H, D]: the D channels of one (pixel, head) are contiguous, so every bilinear
//   corner is one contiguous row of D numbers and the inner loops run (and vectorise) over D.
// - The rows of one (n, h) slice lie H * D numbers apart. At that stride the slice's rows fall
//   into 1 / H of the cache sets and span H times the pages, so that a slice which would fit in
//   the L2 cache thrashes it (at H = 8, D = 32, random sampling runs about 2x slower than on the
//   same rows packed together). When a slice is read many times, it is first gathered into a
//   per-thread buffer of contiguous rows, and the work walks (n, h) slices.
// - Forward: without gathering (few samples per slice, e.g. a decoder's few hundred queries), work
//   items are (n, q, h) in memory order, so the per-query inputs and the output are read and
//   written sequentially; nothing is shared between items.
// - Backward scatters into grad_value, and two queries of one (n, h) may hit the same pixel. Work
//   is split over (n, h), so that each (n, h) slice of grad_value has a single writer and needs no
//   atomics; it accumulates in a contiguous per-thread buffer, written out once at the end of the
//   slice. Queries are split further only when there are fewer (n, h) pairs than threads, each
//   extra split writing its own scratch copy of grad_value, summed at the end. Per-thread copies
//   of the whole grad_value would cost (threads - 1) x its size and a reduction pass instead.
#include "cpu/ms_deform_attn_cpu.h"

#include "bilinear_footprint.h"
#include "ms_deform_attn_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace kmax_m2f {
namespace {

// The hot loops are compiled once per x86-64 level (AVX-512, AVX2 + FMA, baseline SSE2) and the
// best one for the running CPU is picked when the library loads: a wheel cannot assume more than
// SSE2, yet the AVX-512 build of this file runs about 1.6x faster than the SSE2 one (AVX2: 1.4x).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define KMAX_M2F_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KMAX_M2F_CPU_CLONES
#endif

#if defined(__GNUC__)
// Helpers of the cloned functions must be inlined into them to be compiled for their target.
#define KMAX_M2F_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define KMAX_M2F_ALWAYS_INLINE inline
#endif

// Brings the bytes [begin, begin + bytes) towards the cache ahead of use.
KMAX_M2F_ALWAYS_INLINE void prefetch_bytes(const void* begin, int64_t bytes) {
#if defined(__GNUC__)
  constexpr int64_t kCacheLine = 64;
  const char* first = static_cast<const char*>(begin);
  for (int64_t offset = 0; offset < bytes; offset += kCacheLine) {
    __builtin_prefetch(first + offset);
  }
#endif
}

struct KernelArgs {
  MSDeformAttnSizes sizes;
  const int64_t* spatial_shapes;     // [L, 2]
  const int64_t* level_start_index;  // [L]
};

// (batch, query, head) work items per parallel_for chunk in the forward pass: large enough to
// amortise scheduling, small enough to balance threads at Mask2Former sizes (~10^5..10^6 items).
constexpr int64_t kForwardGrain = 256;

// How many queries ahead the slice-wise passes prefetch their per-query inputs.
constexpr int64_t kPrefetchQueries = 4;

// Successive queries of one head are H rows apart in the per-query tensors: too far for the
// hardware prefetchers, which would leave the loads of a slice-wise pass waiting on memory.
template <typename scalar_t>
KMAX_M2F_ALWAYS_INLINE void prefetch_query_inputs(const MSDeformAttnSizes& s,
                                                  int64_t query_head,
                                                  const scalar_t* sampling_locations,
                                                  const scalar_t* attention_weights,
                                                  const scalar_t* grad_output) {
  const int64_t samples = s.num_levels * s.num_points;
  prefetch_bytes(sampling_locations + query_head * samples * 2, samples * 2 * sizeof(scalar_t));
  prefetch_bytes(attention_weights + query_head * samples, samples * sizeof(scalar_t));
  if (grad_output != nullptr) {
    prefetch_bytes(grad_output + query_head * s.channels, s.channels * sizeof(scalar_t));
  }
}

// Copies the S rows of D numbers of one (batch, head) slice, `pixel_stride` apart in value, into
// contiguous `rows` [S, D].
template <typename scalar_t>
KMAX_M2F_ALWAYS_INLINE void gather_rows(const scalar_t* value_head,
                                        int64_t num_values,
                                        int64_t pixel_stride,
                                        int64_t channels,
                                        scalar_t* __restrict rows) {
  for (int64_t pixel = 0; pixel < num_values; ++pixel) {
    std::memcpy(rows + pixel * channels, value_head + pixel * pixel_stride,
                channels * sizeof(scalar_t));
  }
}

// The inverse of gather_rows: writes contiguous `rows` [S, D] into a slice `pixel_stride` apart.
template <typename scalar_t>
KMAX_M2F_ALWAYS_INLINE void scatter_rows(const scalar_t* __restrict rows,
                                         int64_t num_values,
                                         int64_t pixel_stride,
                                         int64_t channels,
                                         scalar_t* slice) {
  for (int64_t pixel = 0; pixel < num_values; ++pixel) {
    std::memcpy(slice + pixel * pixel_stride, rows + pixel * channels,
                channels * sizeof(scalar_t));
  }
}

// One work item of the slice-wise passes: a (batch, head) slice and the split-th of `splits`
// contiguous ranges of its queries.
struct SliceItem {
  int64_t batch;
  int64_t head;
  int64_t split;
  int64_t query_begin;
  int64_t query_end;
};

KMAX_M2F_ALWAYS_INLINE SliceItem slice_item(const MSDeformAttnSizes& s,
                                            int64_t item,
                                            int64_t splits) {
  SliceItem slice;
  slice.split = item % splits;
  slice.head = (item / splits) % s.num_heads;
  slice.batch = item / (splits * s.num_heads);
  slice.query_begin = s.num_queries * slice.split / splits;
  slice.query_end = s.num_queries * (slice.split + 1) / splits;
  return slice;
}

// Adds the samples of one (batch, query, head) into acc[0, D).
template <typename scalar_t, int64_t kChannels>
KMAX_M2F_ALWAYS_INLINE void accumulate_query_head(const KernelArgs& args,
                                                  int64_t channels,
                                                  int64_t pixel_stride,
                                                  const scalar_t* value_head,
                                                  const scalar_t* locations,
                                                  const scalar_t* weights,
                                                  scalar_t* __restrict acc) {
  const MSDeformAttnSizes& s = args.sizes;
  BilinearFootprint<scalar_t> footprint;
  for (int64_t level = 0; level < s.num_levels; ++level) {
    const int64_t height = args.spatial_shapes[2 * level];
    const int64_t width = args.spatial_shapes[2 * level + 1];
    const int64_t level_start = args.level_start_index[level];
    for (int64_t point = 0; point < s.num_points; ++point) {
      const int64_t sample = level * s.num_points + point;
      if (!locate_bilinear_footprint(locations[2 * sample], locations[2 * sample + 1], height,
                                     width, level_start, pixel_stride, footprint)) {
        continue;
      }
      const scalar_t attention = weights[sample];
      for (int corner = 0; corner < 4; ++corner) {
        if (!footprint.inside[corner]) {
          continue;
        }
        const scalar_t weight = attention * footprint.weight[corner];
        const scalar_t* __restrict pixel = value_head + footprint.offset[corner];
        for (int64_t d = 0; d < channels; ++d) {
          acc[d] += weight * pixel[d];
        }
      }
    }
  }
}

// Writes the output row [D] of one (batch, query, head). kChannels > 0 fixes D at compile time
// (unrolled loops, accumulators in registers); kChannels == 0 handles any D, accumulating in out.
template <typename scalar_t, int64_t kChannels>
KMAX_M2F_ALWAYS_INLINE void forward_query_head(const KernelArgs& args,
                                               int64_t channels,
                                               int64_t pixel_stride,
                                               const scalar_t* value_head,
                                               const scalar_t* locations,
                                               const scalar_t* weights,
                                               scalar_t* out) {
  if constexpr (kChannels > 0) {
    scalar_t acc[kChannels] = {};
    accumulate_query_head<scalar_t, kChannels>(args, channels, pixel_stride, value_head,
                                               locations, weights, acc);
    std::copy(acc, acc + kChannels, out);
  } else {
    std::fill(out, out + channels, scalar_t(0));
    accumulate_query_head<scalar_t, kChannels>(args, channels, pixel_stride, value_head,
                                               locations, weights, out);
  }
}

// Forward work items [begin, end) of the (batch, query, head) space.
template <typename scalar_t, int64_t kChannels>
KMAX_M2F_CPU_CLONES void forward_range(const KernelArgs& args,
                                       const scalar_t* value,
                                       const scalar_t* sampling_locations,
                                       const scalar_t* attention_weights,
                                       scalar_t* output,
                                       int64_t begin,
                                       int64_t end) {
  const MSDeformAttnSizes& s = args.sizes;
  const int64_t channels = kChannels > 0 ? kChannels : s.channels;
  const int64_t pixel_stride = s.num_heads * channels;
  const int64_t samples = s.num_levels * s.num_points;
  for (int64_t query_head = begin; query_head < end; ++query_head) {
    // query_head indexes (batch, query, head) in the [N, Lq, H] prefix of the per-query tensors.
    const int64_t head = query_head % s.num_heads;
    const int64_t batch = query_head / (s.num_heads * s.num_queries);
    const scalar_t* locations = sampling_locations + query_head * samples * 2;
    const scalar_t* weights = attention_weights + query_head * samples;
    const scalar_t* value_head = value + batch * s.num_values * pixel_stride + head * channels;
    forward_query_head<scalar_t, kChannels>(args, channels, pixel_stride, value_head, locations,
                                            weights, output + query_head * channels);
  }
}

// Forward work items [begin, end) of the (batch, head, query split) space, each slice gathered
// into contiguous rows first.
template <typename scalar_t, int64_t kChannels>
KMAX_M2F_CPU_CLONES void forward_gathered_range(const KernelArgs& args,
                                                const scalar_t* value,
                                                const scalar_t* sampling_locations,
                                                const scalar_t* attention_weights,
                                                scalar_t* output,
                                                int64_t query_splits,
                                                int64_t begin,
                                                int64_t end) {
  const MSDeformAttnSizes& s = args.sizes;
  const int64_t channels = kChannels > 0 ? kChannels : s.channels;
  const int64_t pixel_stride = s.num_heads * channels;
  const int64_t samples = s.num_levels * s.num_points;
  const auto rows = std::make_unique_for_overwrite<scalar_t[]>(s.num_values * channels);
  for (int64_t item = begin; item < end; ++item) {
    const SliceItem slice = slice_item(s, item, query_splits);
    gather_rows(value + (slice.batch * s.num_values * s.num_heads + slice.head) * channels,
                s.num_values, pixel_stride, channels, rows.get());
    for (int64_t query = slice.query_begin; query < slice.query_end; ++query) {
      const int64_t query_head = (slice.batch * s.num_queries + query) * s.num_heads + slice.head;
      if (query + kPrefetchQueries < slice.query_end) {
        prefetch_query_inputs<scalar_t>(s, query_head + kPrefetchQueries * s.num_heads,
                                        sampling_locations, attention_weights, nullptr);
      }
      const scalar_t* locations = sampling_locations + query_head * samples * 2;
      const scalar_t* weights = attention_weights + query_head * samples;
      // Gathered rows are D apart.
      forward_query_head<scalar_t, kChannels>(args, channels, channels, rows.get(), locations,
                                              weights, output + query_head * channels);
    }
  }
}

// How many query ranges each (batch, head) slice is split into, so that every thread gets at
// least `items_per_thread` work items. More items balance threads better (16 slices on 12
// threads give 4 threads two and leave 8 waiting half the time), but each split costs the
// forward pass one more copy of its slice and the backward pass one more scratch copy of
// grad_value.
int64_t query_splits_for_threads(const MSDeformAttnSizes& s, int64_t items_per_thread) {
  const int64_t head_slices = s.batch * s.num_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t wanted_items = threads * items_per_thread;
  if (threads == 1 || head_slices >= wanted_items || s.num_queries < 2) {
    return 1;
  }
  return std::min<int64_t>((wanted_items + head_slices - 1) / head_slices, s.num_queries);
}

// Work items per thread the forward pass asks of query_splits_for_threads; the backward pass,
// whose splits cost memory, asks for one.
constexpr int64_t kForwardItemsPerThread = 4;

template <typename scalar_t, int64_t kChannels>
void forward_kernel(const KernelArgs& args,
                    const scalar_t* value,
                    const scalar_t* sampling_locations,
                    const scalar_t* attention_weights,
                    scalar_t* output) {
  const MSDeformAttnSizes& s = args.sizes;
  const int64_t query_splits = query_splits_for_threads(s, kForwardItemsPerThread);
  // Gathering a slice costs one pass over its S rows; it pays when each range of queries reads
  // more corner rows (4 per sample) than that.
  const int64_t corner_reads =
      s.num_queries / query_splits * s.num_levels * s.num_points * 4;
  if (corner_reads >= s.num_values) {
    at::parallel_for(0, s.batch * s.num_heads * query_splits, 1, [&](int64_t begin, int64_t end) {
      forward_gathered_range<scalar_t, kChannels>(args, value, sampling_locations,
                                                  attention_weights, output, query_splits, begin,
                                                  end);
    });
    return;
  }
  at::parallel_for(0, s.batch * s.num_heads * s.num_queries, kForwardGrain,
                   [&](int64_t begin, int64_t end) {
                     forward_range<scalar_t, kChannels>(args, value, sampling_locations,
                                                        attention_weights, output, begin, end);
                   });
}

#if defined(__GNUC__)
// 8 floats: one AVX2 register, half an AVX-512 one, two SSE ones. Wider vectors would make the
// transposing reduction below cross 256-bit lanes, which AVX2 does slowly.
typedef float FloatVector8 __attribute__((vector_size(32)));

// Writes the sums of the lanes of partial[0..3] to sums[0..3]: a transposing tree that reduces
// the four vectors together instead of one lane at a time. (Vectors pass by reference: by value
// they would change the ABI between the builds for different instruction sets.)
KMAX_M2F_ALWAYS_INLINE void sum_lanes_of_four(const FloatVector8 (&partial)[4], float sums[4]) {
  const FloatVector8& a = partial[0];
  const FloatVector8& b = partial[1];
  const FloatVector8& c = partial[2];
  const FloatVector8& d = partial[3];
  // [a: 4 partial sums, b: 4], [c: 4, d: 4]
  const FloatVector8 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                          __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  const FloatVector8 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                          __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  // [a: 2, b: 2, c: 2, d: 2]
  const FloatVector8 pairs = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
                             __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  const FloatVector8 singles = __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6, 0, 2, 4, 6) +
                               __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7, 1, 3, 5, 7);
  for (int corner = 0; corner < 4; ++corner) {
    sums[corner] = singles[corner];
  }
}
#endif

// corner_dot[c] = <grad_out, value row of corner c> for the corners on the map.
// Summed one element after the other, each dot product would end in a chain of dependent
// additions; for float rows of a multiple of 8 numbers, 8-lane partial sums of the four corners
// are reduced together instead (about 1.3x faster backward at D = 32).
template <typename scalar_t, int64_t kChannels>
KMAX_M2F_ALWAYS_INLINE void corner_dot_products(const BilinearFootprint<scalar_t>& footprint,
                                                const scalar_t* value_head,
                                                const scalar_t* __restrict grad_out,
                                                int64_t channels,
                                                scalar_t corner_dot[4]) {
#if defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, float> && kChannels > 0 && kChannels % 8 == 0) {
    FloatVector8 partial[4] = {};
    for (int corner = 0; corner < 4; ++corner) {
      if (footprint.inside[corner]) {
        const float* pixel = value_head + footprint.offset[corner];
        for (int64_t base = 0; base < kChannels; base += 8) {
          FloatVector8 grad_chunk;
          FloatVector8 pixel_chunk;
          std::memcpy(&grad_chunk, grad_out + base, sizeof(grad_chunk));
          std::memcpy(&pixel_chunk, pixel + base, sizeof(pixel_chunk));
          partial[corner] += grad_chunk * pixel_chunk;
        }
      }
    }
    sum_lanes_of_four(partial, corner_dot);
    return;
  }
#endif
  for (int corner = 0; corner < 4; ++corner) {
    if (footprint.inside[corner]) {
      const scalar_t* __restrict pixel = value_head + footprint.offset[corner];
      scalar_t dot = 0;
      for (int64_t d = 0; d < channels; ++d) {
        dot += grad_out[d] * pixel[d];
      }
      corner_dot[corner] = dot;
    }
  }
}

// Backward of one (batch, query, head): gradients of its samples, and their contributions
// scattered into its grad_value slice.
template <typename scalar_t, int64_t kChannels>
KMAX_M2F_ALWAYS_INLINE void backward_query_head(const KernelArgs& args,
                                                int64_t channels,
                                                int64_t pixel_stride,
                                                const scalar_t* value_head,
                                                const scalar_t* locations,
                                                const scalar_t* weights,
                                                const scalar_t* __restrict grad_out,
                                                scalar_t* grad_value_head,
                                                scalar_t* grad_locations,
                                                scalar_t* grad_weights) {
  const MSDeformAttnSizes& s = args.sizes;
  BilinearFootprint<scalar_t> footprint;
  for (int64_t level = 0; level < s.num_levels; ++level) {
    const int64_t height = args.spatial_shapes[2 * level];
    const int64_t width = args.spatial_shapes[2 * level + 1];
    const int64_t level_start = args.level_start_index[level];
    for (int64_t point = 0; point < s.num_points; ++point) {
      const int64_t sample = level * s.num_points + point;
      if (!locate_bilinear_footprint(locations[2 * sample], locations[2 * sample + 1], height,
                                     width, level_start, pixel_stride, footprint)) {
        grad_locations[2 * sample] = 0;
        grad_locations[2 * sample + 1] = 0;
        grad_weights[sample] = 0;
        continue;
      }
      const scalar_t attention = weights[sample];
      // Scatter into grad_value.
      for (int corner = 0; corner < 4; ++corner) {
        if (footprint.inside[corner]) {
          scalar_t* __restrict grad_pixel = grad_value_head + footprint.offset[corner];
          const scalar_t weight = attention * footprint.weight[corner];
          for (int64_t d = 0; d < channels; ++d) {
            grad_pixel[d] += weight * grad_out[d];
          }
        }
      }
      // <grad_out, corner value>: the sample's gradient w.r.t. each corner's weight.
      scalar_t corner_dot[4] = {0, 0, 0, 0};
      corner_dot_products<scalar_t, kChannels>(footprint, value_head, grad_out, channels,
                                               corner_dot);
      const SampleGradients<scalar_t> gradients =
          sample_gradients(footprint, corner_dot, attention, height, width);
      grad_weights[sample] = gradients.attention_weight;
      grad_locations[2 * sample] = gradients.location_x;
      grad_locations[2 * sample + 1] = gradients.location_y;
    }
  }
}

// Backward work items [begin, end) of the (batch, head, query split) space. Each item owns its
// slice of grad_value (split 0) or of its scratch copy (splits 1..), so the scatter needs no
// atomics; it gathers the slice's value rows and accumulates its gradient in contiguous buffers.
template <typename scalar_t, int64_t kChannels>
KMAX_M2F_CPU_CLONES void backward_range(const KernelArgs& args,
                                        const scalar_t* value,
                                        const scalar_t* sampling_locations,
                                        const scalar_t* attention_weights,
                                        const scalar_t* grad_output,
                                        scalar_t* grad_value,
                                        scalar_t* grad_value_scratch,
                                        int64_t query_splits,
                                        scalar_t* grad_sampling_locations,
                                        scalar_t* grad_attention_weights,
                                        int64_t begin,
                                        int64_t end) {
  const MSDeformAttnSizes& s = args.sizes;
  const int64_t channels = kChannels > 0 ? kChannels : s.channels;
  const int64_t pixel_stride = s.num_heads * channels;
  const int64_t samples = s.num_levels * s.num_points;
  const int64_t value_numel = s.batch * s.num_values * pixel_stride;
  // The value rows and their gradient share one buffer, the gradient half a page further on
  // than the rows' own end. Two separate large buffers would start at the same offset within a
  // page, and the CPU stalls loads of a row whose address matches a pending store to its
  // gradient in the low 12 bits (about 10% of this pass).
  const int64_t slice_numel = s.num_values * channels;
  const int64_t half_page = 2048 / static_cast<int64_t>(sizeof(scalar_t));
  const auto buffer = std::make_unique_for_overwrite<scalar_t[]>(2 * slice_numel + half_page);
  scalar_t* rows = buffer.get();
  scalar_t* grad_rows = buffer.get() + slice_numel + half_page;
  for (int64_t item = begin; item < end; ++item) {
    const SliceItem slice = slice_item(s, item, query_splits);
    const int64_t head_offset = (slice.batch * s.num_values * s.num_heads + slice.head) * channels;
    gather_rows(value + head_offset, s.num_values, pixel_stride, channels, rows);
    std::fill(grad_rows, grad_rows + slice_numel, scalar_t(0));

    for (int64_t query = slice.query_begin; query < slice.query_end; ++query) {
      const int64_t query_head = (slice.batch * s.num_queries + query) * s.num_heads + slice.head;
      if (query + kPrefetchQueries < slice.query_end) {
        prefetch_query_inputs<scalar_t>(s, query_head + kPrefetchQueries * s.num_heads,
                                        sampling_locations, attention_weights, grad_output);
      }
      const scalar_t* grad_out = grad_output + query_head * channels;
      const scalar_t* locations = sampling_locations + query_head * samples * 2;
      const scalar_t* weights = attention_weights + query_head * samples;
      scalar_t* grad_locations = grad_sampling_locations + query_head * samples * 2;
      scalar_t* grad_weights = grad_attention_weights + query_head * samples;
      if constexpr (kChannels > 0) {
        // A local copy lets the compiler keep grad_out in registers across the samples.
        scalar_t grad_out_local[kChannels];
        std::copy(grad_out, grad_out + kChannels, grad_out_local);
        backward_query_head<scalar_t, kChannels>(args, channels, channels, rows, locations,
                                                 weights, grad_out_local, grad_rows,
                                                 grad_locations, grad_weights);
      } else {
        backward_query_head<scalar_t, kChannels>(args, channels, channels, rows, locations,
                                                 weights, grad_out, grad_rows,
                                                 grad_locations, grad_weights);
      }
    }
    scalar_t* destination =
        slice.split == 0 ? grad_value : grad_value_scratch + (slice.split - 1) * value_numel;
    scatter_rows(grad_rows, s.num_values, pixel_stride, channels,
                 destination + head_offset);
  }
}

template <typename scalar_t, int64_t kChannels>
void backward_kernel(const KernelArgs& args,
                     const scalar_t* value,
                     const scalar_t* sampling_locations,
                     const scalar_t* attention_weights,
                     const scalar_t* grad_output,
                     scalar_t* grad_value,
                     scalar_t* grad_value_scratch,
                     int64_t query_splits,
                     scalar_t* grad_sampling_locations,
                     scalar_t* grad_attention_weights) {
  const MSDeformAttnSizes& s = args.sizes;
  at::parallel_for(0, s.batch * s.num_heads * query_splits, 1, [&](int64_t begin, int64_t end) {
    backward_range<scalar_t, kChannels>(args, value, sampling_locations, attention_weights,
                                        grad_output, grad_value, grad_value_scratch,
                                        query_splits, grad_sampling_locations,
                                        grad_attention_weights, begin, end);
  });
}

// Calls fn(std::integral_constant<int64_t, D>) for the common head sizes, else with D = 0.
template <typename Fn>
void dispatch_channels(int64_t channels, Fn&& fn) {
  switch (channels) {
    case 16:
      fn(std::integral_constant<int64_t, 16>{});
      return;
    case 32:
      fn(std::integral_constant<int64_t, 32>{});
      return;
    case 64:
      fn(std::integral_constant<int64_t, 64>{});
      return;
    default:
      fn(std::integral_constant<int64_t, 0>{});
  }
}

KernelArgs prepare(const at::Tensor& value,
                   const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  const MSDeformAttnSizes sizes = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_cpu: inputs must be CPU tensors");
  TORCH_CHECK(spatial_shapes.is_contiguous() && level_start_index.is_contiguous(),
              "ms_deform_attn_cpu: spatial_shapes and level_start_index must be contiguous");
  check_levels_fit(spatial_shapes, level_start_index, sizes);
  return KernelArgs{sizes, spatial_shapes.data_ptr<int64_t>(),
                    level_start_index.data_ptr<int64_t>()};
}

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value,
                                      const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const KernelArgs args = prepare(value, shapes, starts, sampling_locations, attention_weights);
  const MSDeformAttnSizes& s = args.sizes;
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  at::Tensor output =
      at::empty({s.batch, s.num_queries, s.num_heads * s.channels}, value.options());

  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    dispatch_channels(s.channels, [&](auto fixed_channels) {
      forward_kernel<scalar_t, decltype(fixed_channels)::value>(
          args, value_c.const_data_ptr<scalar_t>(), locations_c.const_data_ptr<scalar_t>(),
          weights_c.const_data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
    });
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output) {
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const KernelArgs args = prepare(value, shapes, starts, sampling_locations, attention_weights);
  const MSDeformAttnSizes& s = args.sizes;
  check_grad_output(grad_output, value, s);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  const at::Tensor grad_output_c = grad_output.contiguous();

  // Split queries only as much as needed to give every thread work (see the file comment).
  const int64_t query_splits = query_splits_for_threads(s, 1);

  // Every element of these is written by the kernel.
  at::Tensor grad_value = at::empty_like(value_c);
  at::Tensor grad_value_scratch;
  if (query_splits > 1) {
    grad_value_scratch = at::empty({query_splits - 1, s.batch, s.num_values, s.num_heads,
                                    s.channels},
                                   value.options());
  }
  at::Tensor grad_locations = at::empty_like(locations_c);
  at::Tensor grad_weights = at::empty_like(weights_c);

  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    dispatch_channels(s.channels, [&](auto fixed_channels) {
      backward_kernel<scalar_t, decltype(fixed_channels)::value>(
          args, value_c.const_data_ptr<scalar_t>(), locations_c.const_data_ptr<scalar_t>(),
          weights_c.const_data_ptr<scalar_t>(), grad_output_c.const_data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(),
          query_splits > 1 ? grad_value_scratch.data_ptr<scalar_t>() : nullptr, query_splits,
          grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>());
    });
  });
  if (query_splits > 1) {
    grad_value.add_(grad_value_scratch.sum(0));
  }
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace kmax_m2f
