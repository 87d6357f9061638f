// Python bindings of kmax_m2f._C.
#include "ms_deform_attn.h"

#include <torch/extension.h>

namespace {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kmax_m2f native kernels: multi-scale deformable attention (CPU, and CUDA if built)";
  m.def("ms_deform_attn_forward", &kmax_m2f::ms_deform_attn_forward,
        "MSDeformAttn forward: (value [N,S,H,D], spatial_shapes [L,2], level_start_index [L], "
        "sampling_locations [N,Lq,H,L,P,2], attention_weights [N,Lq,H,L,P]) -> [N,Lq,H*D]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"));
  m.def("ms_deform_attn_backward", &kmax_m2f::ms_deform_attn_backward,
        "MSDeformAttn backward: forward's inputs and grad_output [N,Lq,H*D] -> "
        "[grad_value, grad_sampling_locations, grad_attention_weights]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"));
  m.def("has_cuda", &has_cuda, "Whether this build contains the CUDA kernel");
}
