// Where one sampling point falls on a level, shared by the CPU and CUDA kernels so that both
// follow grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) on
// 2 * location - 1 exactly.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace kmax_m2f {

// The four pixels around a sampling point and their bilinear weights.
// Corner order: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
template <typename acc_t>
struct BilinearFootprint {
  int64_t offset[4];  // element offset of the corner's channels, relative to the head's slice
  bool inside[4];     // corners off the map read as zero
  acc_t weight[4];
  acc_t frac_x;       // x - x0
  acc_t frac_y;       // y - y0
};

template <typename acc_t>
C10_HOST_DEVICE inline acc_t floor_value(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::floor(x);
#else
  return std::floor(x);
#endif
}

// Fills `footprint` for a location (x, y) in [0, 1] units of a height x width level whose pixels
// start at `level_start` in value (rows of `pixel_stride` elements). Returns false when all four
// corners are off the map (the sample is zero and so are its gradients).
template <typename acc_t>
C10_HOST_DEVICE inline bool locate_bilinear_footprint(acc_t location_x,
                                                      acc_t location_y,
                                                      int64_t height,
                                                      int64_t width,
                                                      int64_t level_start,
                                                      int64_t pixel_stride,
                                                      BilinearFootprint<acc_t>& footprint) {
  // align_corners=False: pixel centres sit at (i + 0.5) / size in normalised coordinates.
  const acc_t x = location_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = location_y * static_cast<acc_t>(height) - acc_t(0.5);
  // Outside these bounds every corner is off the map. Written as a negation so that NaN
  // locations are skipped too.
  if (!(x >= acc_t(-1) && x < static_cast<acc_t>(width) && y >= acc_t(-1) &&
        y < static_cast<acc_t>(height))) {
    return false;
  }
  const acc_t x0 = floor_value(x);
  const acc_t y0 = floor_value(y);
  const int64_t col = static_cast<int64_t>(x0);
  const int64_t row = static_cast<int64_t>(y0);
  const acc_t fx = x - x0;
  const acc_t fy = y - y0;
  footprint.frac_x = fx;
  footprint.frac_y = fy;
  footprint.weight[0] = (1 - fy) * (1 - fx);
  footprint.weight[1] = (1 - fy) * fx;
  footprint.weight[2] = fy * (1 - fx);
  footprint.weight[3] = fy * fx;
  const bool has_left = col >= 0;
  const bool has_right = col + 1 < width;
  const bool has_top = row >= 0;
  const bool has_bottom = row + 1 < height;
  footprint.inside[0] = has_top && has_left;
  footprint.inside[1] = has_top && has_right;
  footprint.inside[2] = has_bottom && has_left;
  footprint.inside[3] = has_bottom && has_right;
  const int64_t top_left = (level_start + row * width + col) * pixel_stride;
  footprint.offset[0] = top_left;
  footprint.offset[1] = top_left + pixel_stride;
  footprint.offset[2] = top_left + width * pixel_stride;
  footprint.offset[3] = footprint.offset[2] + pixel_stride;
  return true;
}

// Gradients of one sample from <grad_output, corner value> of its four corners: w.r.t. its
// attention weight, and w.r.t. its location (x, y) in [0, 1] units (chain rule through
// x = location_x * width - 0.5, likewise y). Corners off the map have a zero product.
template <typename acc_t>
struct SampleGradients {
  acc_t attention_weight;
  acc_t location_x;
  acc_t location_y;
};

template <typename acc_t>
C10_HOST_DEVICE inline SampleGradients<acc_t> sample_gradients(
    const BilinearFootprint<acc_t>& footprint,
    const acc_t corner_dot[4],
    acc_t attention_weight,
    int64_t height,
    int64_t width) {
  const acc_t fx = footprint.frac_x;
  const acc_t fy = footprint.frac_y;
  // Partial derivatives of the bilinear interpolant along x and y.
  const acc_t along_x = (1 - fy) * (corner_dot[1] - corner_dot[0]) +
                        fy * (corner_dot[3] - corner_dot[2]);
  const acc_t along_y = (1 - fx) * (corner_dot[2] - corner_dot[0]) +
                        fx * (corner_dot[3] - corner_dot[1]);
  SampleGradients<acc_t> gradients;
  gradients.attention_weight =
      footprint.weight[0] * corner_dot[0] + footprint.weight[1] * corner_dot[1] +
      footprint.weight[2] * corner_dot[2] + footprint.weight[3] * corner_dot[3];
  gradients.location_x = attention_weight * along_x * static_cast<acc_t>(width);
  gradients.location_y = attention_weight * along_y * static_cast<acc_t>(height);
  return gradients;
}

}  // namespace kmax_m2f
