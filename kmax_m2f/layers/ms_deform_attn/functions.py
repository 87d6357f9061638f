"""Multi-scale deformable attention: input checks, kernel selection and the autograd function.

``ms_deform_attn`` runs the native kernel of ``kmax_m2f._C`` for the inputs' device (the C++ CPU
kernel for CPU tensors, the CUDA kernel for CUDA tensors). When the extension is not built, or
lacks a kernel for the device, it logs one warning and runs the PyTorch reference instead.
"""

import functools
import logging
from types import ModuleType

import torch
from torch.autograd import Function
from torch.autograd.function import FunctionCtx, once_differentiable

from .reference import ms_deform_attn_reference

__all__ = ["MSDeformAttnFunction", "ms_deform_attn", "check_ms_deform_attn_inputs"]

logger = logging.getLogger(__name__)

_BUILD_HINT = "Build it with `make setup` or `pip install -e . --no-build-isolation`."
# Dtypes the native kernels take directly. The CUDA kernel also takes float16 and bfloat16;
# on the CPU those are computed in float32 (see ms_deform_attn).
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Warnings already logged, so that each fallback is reported once per process.
_issued_warnings: set[str] = set()


@functools.lru_cache(maxsize=None)
def _load_extension() -> tuple[ModuleType | None, str]:
    """The compiled ``kmax_m2f._C`` module, or None and the reason it could not be imported."""
    try:
        from kmax_m2f import _C
    except ImportError as error:
        return None, str(error)
    return _C, ""


def _warn_once(message: str) -> None:
    if message not in _issued_warnings:
        _issued_warnings.add(message)
        logger.warning(message)


def _require_extension() -> ModuleType:
    extension, import_error = _load_extension()
    if extension is None:
        raise RuntimeError(
            f"MSDeformAttnFunction needs the compiled kmax_m2f._C ({import_error}). {_BUILD_HINT}"
        )
    return extension


def _native_kernel_for(device: torch.device) -> ModuleType | None:
    """The extension module if it has a kernel for ``device``; else None, with one warning."""
    extension, import_error = _load_extension()
    if extension is None:
        _warn_once(
            f"kmax_m2f._C is not available ({import_error}): multi-scale deformable attention "
            f"falls back to the slow, memory-hungry PyTorch reference. {_BUILD_HINT}"
        )
        return None
    if device.type == "cpu":
        return extension
    if device.type == "cuda":
        if extension.has_cuda():
            return extension
        _warn_once(
            "kmax_m2f._C was built without its CUDA kernel (no CUDA toolkit was found at build "
            "time): multi-scale deformable attention on the GPU falls back to the slow PyTorch "
            f"reference. Rebuild on a machine with nvcc (set CUDA_HOME, or FORCE_CUDA=1). "
            f"{_BUILD_HINT}"
        )
        return None
    _warn_once(
        f"kmax_m2f._C has no multi-scale deformable attention kernel for {device.type} tensors: "
        "falling back to the PyTorch reference."
    )
    return None


def check_ms_deform_attn_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise ValueError / TypeError unless the arguments of ``ms_deform_attn`` fit together.

    The level sizes are compared with S on the host: one device sync for CUDA tensors, as in
    the official module's assertion.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, H, D], got shape {tuple(value.shape)}")
    batch, num_values, num_heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be [N, Lq, H, L, P, 2], got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != num_heads:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} and value "
            f"{tuple(value.shape)} disagree on N or H"
        )
    expected_weights = (batch, num_queries, num_heads, num_levels, num_points)
    if tuple(attention_weights.shape) != expected_weights:
        raise ValueError(
            f"attention_weights must be [N, Lq, H, L, P] = {expected_weights}, got "
            f"{tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (num_levels, 2):
        raise ValueError(
            f"spatial_shapes must be [L, 2] with L = {num_levels} (from sampling_locations), "
            f"got shape {tuple(spatial_shapes.shape)}"
        )
    if tuple(level_start_index.shape) != (num_levels,):
        raise ValueError(
            f"level_start_index must be [L] with L = {num_levels}, got shape "
            f"{tuple(level_start_index.shape)}"
        )
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise TypeError(
            "spatial_shapes and level_start_index must be int64, got "
            f"{spatial_shapes.dtype} and {level_start_index.dtype}"
        )
    dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
    if value.dtype not in _FLOAT_DTYPES or len(set(dtypes)) != 1:
        raise TypeError(
            "value, sampling_locations and attention_weights must share one floating dtype "
            f"(float16, bfloat16, float32 or float64), got {dtypes}"
        )
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    devices = {tensor.device for tensor in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")

    level_sizes = spatial_shapes.detach().cpu().prod(dim=1)
    if bool((level_sizes <= 0).any()):
        raise ValueError(f"spatial_shapes must be positive, got {spatial_shapes.tolist()}")
    if int(level_sizes.sum()) != num_values:
        raise ValueError(
            f"spatial_shapes {spatial_shapes.tolist()} cover {int(level_sizes.sum())} pixels "
            f"but value has S = {num_values}"
        )
    expected_starts = torch.cumsum(level_sizes, dim=0) - level_sizes
    if not torch.equal(level_start_index.detach().cpu(), expected_starts):
        raise ValueError(
            f"level_start_index must be {expected_starts.tolist()} for spatial_shapes "
            f"{spatial_shapes.tolist()}, got {level_start_index.tolist()}"
        )


class MSDeformAttnFunction(Function):
    """Autograd function over the native kernels of ``kmax_m2f._C`` (CPU or CUDA by device).

    Takes the arguments of ``ms_deform_attn``, already checked and of a dtype the device's
    kernel supports; returns [N, Lq, H * D]. Gradients flow to value, sampling_locations and
    attention_weights. Prefer ``ms_deform_attn``, which checks inputs and picks the kernel.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        output = _require_extension().ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return output

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, torch.Tensor, torch.Tensor]:
        extension = _require_extension()
        gradients = extension.ms_deform_attn_backward(*ctx.saved_tensors, grad_output.contiguous())
        grad_value, grad_sampling_locations, grad_attention_weights = gradients
        return grad_value, None, None, grad_sampling_locations, grad_attention_weights


def _run(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    if _native_kernel_for(value.device) is None:
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR), differentiable.

    Each query and head sums, over levels l and points p, attention_weights[..., l, p] times
    value bilinearly sampled on level l at sampling_locations[..., l, p, :], with
    ``grid_sample(align_corners=False, padding_mode="zeros")`` semantics on ``2 * loc - 1``.

    Args:
        value: [N, S, H, D], the flattened pixels of all levels, split into H heads of D channels.
        spatial_shapes: [L, 2] int64, (height, width) of each level; sum of height * width = S.
        level_start_index: [L] int64, index in S of each level's first pixel.
        sampling_locations: [N, Lq, H, L, P, 2], (x, y) normalised to [0, 1]; points outside
            read zeros.
        attention_weights: [N, Lq, H, L, P].

    Returns:
        [N, Lq, H * D], in the dtype of value (float32 under autocast).
    """
    device_type = value.device.type
    if torch.is_autocast_enabled(device_type):
        # As the official op (custom_fwd(cast_inputs=float32)): under mixed precision the
        # locations arrive in float32 and the value in half precision. Sampling in bfloat16 would
        # round locations in [0.5, 1) to steps of 1/256: half a pixel on a 128-wide level.
        with torch.autocast(device_type, enabled=False):
            return ms_deform_attn(
                value.float(),
                spatial_shapes,
                level_start_index,
                sampling_locations.float(),
                attention_weights.float(),
            )
    check_ms_deform_attn_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    if device_type == "cpu" and value.dtype not in _CPU_KERNEL_DTYPES:
        # The CPU kernel accumulates in its input type: run half inputs in float32.
        output = _run(
            value.float(),
            spatial_shapes,
            level_start_index,
            sampling_locations.float(),
            attention_weights.float(),
        )
        return output.to(value.dtype)
    return _run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
