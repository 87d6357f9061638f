"""One rule for the numerics that must not run in half precision."""
import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is half / bfloat16 (or an integer or bool mask), unchanged if it is
    float32 or float64: losses, softmaxes and sums over many elements lose accuracy in 16 bits,
    and a float64 model (the parity tests) stays float64 throughout."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
