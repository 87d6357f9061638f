"""Multi-scale deformable attention: native kernels against the PyTorch reference, the layer, and
the choice of implementation."""

import logging
import math

import pytest
import torch

from kmax_m2f.layers.ms_deform_attn import (
    MSDeformAttn,
    MSDeformAttnFunction,
    functions,
    ms_deform_attn,
    ms_deform_attn_reference,
)

# (height, width) per level. Mask2Former samples 3 levels (strides 8, 16, 32 of a square crop);
# the others add non-square and degenerate (1-pixel-wide) levels.
MASK2FORMER_LEVELS = [(16, 16), (8, 8), (4, 4)]
NON_SQUARE_LEVELS = [(6, 11), (3, 5), (1, 3), (2, 1)]
SINGLE_LEVEL = [(5, 7)]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def extension():
    """The kernels under test; without them every test here would silently test the fallback."""
    module, import_error = functions._load_extension()
    if module is None:
        pytest.fail(
            f"kmax_m2f._C is not built ({import_error}); run `make setup` or "
            "`pip install -e . --no-build-isolation`"
        )
    return module


def make_inputs(
    levels: list[tuple[int, int]],
    batch: int = 2,
    heads: int = 2,
    channels: int = 8,
    queries: int = 9,
    points: int = 3,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    location_range: tuple[float, float] = (-0.2, 1.2),
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights); the
    default location range puts about half of the points partly or fully off the map."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    level_sizes = spatial_shapes.prod(dim=1)
    level_start_index = torch.cumsum(level_sizes, dim=0) - level_sizes
    num_values = int(level_sizes.sum())
    value = torch.randn(batch, num_values, heads, channels, generator=generator, dtype=dtype)
    low, high = location_range
    sampling_locations = low + (high - low) * torch.rand(
        batch, queries, heads, len(levels), points, 2, generator=generator, dtype=dtype
    )
    attention_weights = torch.rand(
        batch, queries, heads, len(levels), points, generator=generator, dtype=dtype
    )
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return tuple(tensor.to(device) for tensor in tensors)


def forward_and_gradients(function, inputs, grad_output=None):
    """Output and gradients w.r.t. value, sampling_locations and attention_weights."""
    value, spatial_shapes, level_start_index, locations, weights = (
        tensor.detach().clone() for tensor in inputs
    )
    differentiable = [value, locations, weights]
    for tensor in differentiable:
        tensor.requires_grad_(True)
    output = function(value, spatial_shapes, level_start_index, locations, weights)
    if grad_output is None:
        grad_output = torch.randn(
            output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype
        ).to(output.device)
    gradients = torch.autograd.grad(output, differentiable, grad_output)
    return (output.detach(), *gradients), grad_output


def assert_all_close(actual, expected, rtol, atol):
    """Compare output and gradients; atol is relative to each tensor's largest magnitude, since
    location gradients (scaled by the level sizes) are differences of nearly equal products."""
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, a, e in zip(names, actual, expected):
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "levels, channels, points",
    [
        (MASK2FORMER_LEVELS, 32, 4),  # Mask2Former's head size, fixed-size kernel
        (NON_SQUARE_LEVELS, 8, 3),  # any head size, generic kernel
        (SINGLE_LEVEL, 16, 1),
        (MASK2FORMER_LEVELS, 64, 2),
    ],
)
def test_cpu_kernel_matches_reference_float32(levels, channels, points):
    inputs = make_inputs(levels, channels=channels, points=points)
    expected, grad_output = forward_and_gradients(ms_deform_attn_reference, inputs)
    actual, _ = forward_and_gradients(MSDeformAttnFunction.apply, inputs, grad_output)
    assert_all_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levels", [MASK2FORMER_LEVELS, NON_SQUARE_LEVELS])
def test_cpu_kernel_matches_reference_float64(levels):
    inputs = make_inputs(levels, channels=5, dtype=torch.float64)
    expected, grad_output = forward_and_gradients(ms_deform_attn_reference, inputs)
    actual, _ = forward_and_gradients(MSDeformAttnFunction.apply, inputs, grad_output)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("levels, channels", [(NON_SQUARE_LEVELS, 3), (MASK2FORMER_LEVELS, 16)])
def test_cpu_kernel_gradcheck(levels, channels):
    if levels is MASK2FORMER_LEVELS:
        levels = [(4, 4), (2, 2), (1, 1)]
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        levels, batch=1, heads=2, channels=channels, queries=3, points=2, dtype=torch.float64
    )
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)
    assert torch.autograd.gradcheck(
        MSDeformAttnFunction.apply,
        (value, spatial_shapes, level_start_index, locations, weights),
        eps=1e-6,
        atol=1e-6,
    )


def test_points_on_and_beyond_the_borders():
    """Corners, edges, half-pixels and points far outside, with grid_sample's semantics."""
    levels = [(4, 6), (3, 2)]
    value, spatial_shapes, level_start_index, _, _ = make_inputs(levels, batch=1, heads=1)
    coordinates = torch.tensor(
        [-1.0, -0.3, -0.125, 0.0, 1e-7, 0.125, 0.5, 0.75, 1.0 - 1e-7, 1.0, 1.125, 1.3, 2.0]
    )
    xs, ys = torch.meshgrid(coordinates, coordinates, indexing="xy")
    grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # [Q, 2]
    queries = grid.shape[0]
    locations = grid[None, :, None, None, None, :].expand(1, queries, 1, len(levels), 1, 2)
    weights = torch.ones(1, queries, 1, len(levels), 1)
    inputs = (value, spatial_shapes, level_start_index, locations.contiguous(), weights)
    expected, grad_output = forward_and_gradients(ms_deform_attn_reference, inputs)
    actual, _ = forward_and_gradients(MSDeformAttnFunction.apply, inputs, grad_output)
    assert_all_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_points_fully_outside_give_zeros():
    inputs = make_inputs(NON_SQUARE_LEVELS, location_range=(1.6, 3.0))
    (output, grad_value, grad_locations, grad_weights), _ = forward_and_gradients(
        MSDeformAttnFunction.apply, inputs
    )
    for tensor in (output, grad_value, grad_locations, grad_weights):
        assert torch.count_nonzero(tensor) == 0


@pytest.mark.parametrize("threads", [1, 4])
def test_cpu_backward_with_more_threads_than_heads(threads):
    """With fewer (image, head) pairs than threads the backward pass splits queries over
    private copies of grad_value; with one thread it runs serially."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(MASK2FORMER_LEVELS, batch=1, heads=1, channels=32, queries=64)
        expected, grad_output = forward_and_gradients(ms_deform_attn_reference, inputs)
        actual, _ = forward_and_gradients(MSDeformAttnFunction.apply, inputs, grad_output)
    finally:
        torch.set_num_threads(previous)
    assert_all_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 6])
@pytest.mark.parametrize("channels", [32, 5])
@pytest.mark.parametrize("queries", [2, 200])
def test_cpu_kernel_in_place_and_gathered_slices(queries, channels, threads):
    """The CPU kernel reads value in place when a slice has few samples (2 queries: 72 corner
    reads for 336 pixels) and copies each (image, head) slice into contiguous rows when it has
    many (200 queries), with fixed (32) and any (5) head sizes, one thread or several (6 threads
    for 2 x 2 slices: queries split over scratch copies)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(
            MASK2FORMER_LEVELS, channels=channels, queries=queries, dtype=torch.float64
        )
        expected, grad_output = forward_and_gradients(ms_deform_attn_reference, inputs)
        actual, _ = forward_and_gradients(MSDeformAttnFunction.apply, inputs, grad_output)
    finally:
        torch.set_num_threads(previous)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_non_contiguous_inputs():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(NON_SQUARE_LEVELS)
    # Same numbers, other memory layouts.
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.transpose(1, 2).contiguous().transpose(1, 2)
    expected = MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, locations, weights
    )
    actual = ms_deform_attn(value_t, spatial_shapes, level_start_index, locations_t, weights)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs_run_in_float32(dtype):
    inputs = make_inputs(MASK2FORMER_LEVELS, channels=32, dtype=dtype)
    output = ms_deform_attn(*inputs)
    assert output.dtype == dtype
    expected = ms_deform_attn(*(t.float() if t.is_floating_point() else t for t in inputs))
    torch.testing.assert_close(output.float(), expected, rtol=1e-2, atol=1e-2)


def test_autocast_computes_in_float32():
    inputs = make_inputs(MASK2FORMER_LEVELS, channels=32)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ms_deform_attn(
            value.bfloat16(), spatial_shapes, level_start_index, locations, weights
        )
    assert output.dtype == torch.float32
    expected = ms_deform_attn(
        value.bfloat16().float(), spatial_shapes, level_start_index, locations, weights
    )
    torch.testing.assert_close(output, expected)


def _invalid_inputs(case: str) -> tuple[torch.Tensor, ...]:
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(NON_SQUARE_LEVELS)
    if case == "levels do not cover S":
        spatial_shapes = spatial_shapes.clone()
        spatial_shapes[-1, 0] += 1
    elif case == "wrong level starts":
        level_start_index = level_start_index + 1
    elif case == "int32 spatial_shapes":
        spatial_shapes = spatial_shapes.int()
    elif case == "mixed dtypes":
        weights = weights.double()
    elif case == "heads differ":
        locations = locations[:, :, :1]
    elif case == "weights shape":
        weights = weights[..., :-1]
    elif case == "value rank":
        value = value.flatten(2)
    return value, spatial_shapes, level_start_index, locations, weights


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("levels do not cover S", ValueError, "cover .* pixels but value has S"),
        ("wrong level starts", ValueError, "level_start_index must be"),
        ("int32 spatial_shapes", TypeError, "must be int64"),
        ("mixed dtypes", TypeError, "share one floating dtype"),
        ("heads differ", ValueError, "disagree on N or H"),
        ("weights shape", ValueError, r"attention_weights must be \[N, Lq, H, L, P\]"),
        ("value rank", ValueError, r"value must be \[N, S, H, D\]"),
    ],
)
def test_invalid_inputs_raise_clear_errors(case, error, match):
    with pytest.raises(error, match=match):
        ms_deform_attn(*_invalid_inputs(case))


def test_kernel_checks_its_own_inputs(extension):
    """The raw entry point must refuse what would make it read out of bounds."""
    value, spatial_shapes, level_start_index, locations, weights = _invalid_inputs(
        "levels do not cover S"
    )
    with pytest.raises(RuntimeError, match="spatial_shapes cover"):
        extension.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, locations, weights
        )


def test_kernel_backward_checks_grad_output(extension):
    inputs = make_inputs(NON_SQUARE_LEVELS)
    output = extension.ms_deform_attn_forward(*inputs)
    with pytest.raises(RuntimeError, match=r"grad_output must be \[N, Lq, H \* D\] = \[2, 9, 16\]"):
        extension.ms_deform_attn_backward(*inputs, output[:, :-1])
    with pytest.raises(RuntimeError, match="grad_output must be a Float tensor"):
        extension.ms_deform_attn_backward(*inputs, output.double())


# ---------------------------------------------------------------------------------------------
# Choice of implementation


def test_extension_is_used_for_cpu_tensors():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(SINGLE_LEVEL)
    value.requires_grad_(True)
    output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    assert "MSDeformAttnFunction" in type(output.grad_fn).__name__


def test_without_extension_falls_back_to_reference_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(functions, "_load_extension", lambda: (None, "hidden by the test"))
    monkeypatch.setattr(functions, "_issued_warnings", set())
    inputs = make_inputs(NON_SQUARE_LEVELS)
    with caplog.at_level(logging.WARNING, logger=functions.__name__):
        outputs = [ms_deform_attn(*inputs) for _ in range(3)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "hidden by the test" in message
    assert "make setup" in message and "pip install -e . --no-build-isolation" in message
    expected = ms_deform_attn_reference(*inputs)
    for output in outputs:
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="make setup"):
        MSDeformAttnFunction.apply(*inputs)


def test_kernel_errors_are_not_hidden_by_the_fallback(monkeypatch):
    """Only a failed import of kmax_m2f._C selects the reference; a kernel error propagates."""

    class FailingExtension:
        @staticmethod
        def ms_deform_attn_forward(*args):
            raise RuntimeError("kernel failure")

    monkeypatch.setattr(functions, "_load_extension", lambda: (FailingExtension, ""))
    with pytest.raises(RuntimeError, match="kernel failure"):
        ms_deform_attn(*make_inputs(SINGLE_LEVEL))


# ---------------------------------------------------------------------------------------------
# The layer


def test_module_parameter_names_and_shapes():
    layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    shapes = {name: tuple(p.shape) for name, p in layer.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (8 * 4 * 4 * 2, 256),
        "sampling_offsets.bias": (8 * 4 * 4 * 2,),
        "attention_weights.weight": (8 * 4 * 4, 256),
        "attention_weights.bias": (8 * 4 * 4,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }


def test_module_initialisation():
    heads, levels, points = 8, 3, 4
    layer = MSDeformAttn(d_model=64, n_levels=levels, n_heads=heads, n_points=points)
    assert torch.count_nonzero(layer.sampling_offsets.weight) == 0
    offsets = layer.sampling_offsets.bias.detach().view(heads, levels, points, 2)
    # Head h points along angle 2*pi*h/8, scaled so the larger coordinate is 1: (1, 0), (1, 1),
    # (0, 1), (-1, 1), ...; point k lies k + 1 steps away, on every level.
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
        dtype=torch.float32,
    )
    expected = directions[:, None, None, :] * torch.arange(1, points + 1)[None, None, :, None]
    torch.testing.assert_close(offsets, expected.expand_as(offsets), atol=1e-5, rtol=0)
    assert torch.count_nonzero(layer.attention_weights.weight) == 0
    assert torch.count_nonzero(layer.attention_weights.bias) == 0
    for projection in (layer.value_proj, layer.output_proj):
        fan_out, fan_in = projection.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform
        assert projection.weight.abs().max() <= bound
        assert projection.weight.std() > bound / 3
        assert torch.count_nonzero(projection.bias) == 0


def test_module_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MSDeformAttn(d_model=100, n_heads=8)


def _module_inputs(levels, batch=2, queries=5, d_model=32, box_references=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    level_sizes = spatial_shapes.prod(dim=1)
    level_start_index = torch.cumsum(level_sizes, dim=0) - level_sizes
    num_values = int(level_sizes.sum())
    query = torch.randn(batch, queries, d_model, generator=generator)
    reference_points = torch.rand(batch, queries, len(levels), 2, generator=generator)
    if box_references:
        sizes = 0.1 + 0.3 * torch.rand(batch, queries, len(levels), 2, generator=generator)
        reference_points = torch.cat([reference_points, sizes], dim=-1)
    input_flatten = torch.randn(batch, num_values, d_model, generator=generator)
    return query, reference_points, input_flatten, spatial_shapes, level_start_index


@pytest.mark.parametrize("box_references", [False, True])
def test_module_forward_shapes_and_kernel_vs_reference(monkeypatch, box_references):
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    # Random weights, so that offsets and attention depend on the query.
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    inputs = _module_inputs(MASK2FORMER_LEVELS, box_references=box_references)
    output = layer(*inputs)
    assert output.shape == (2, 5, 32)
    monkeypatch.setattr(functions, "_load_extension", lambda: (None, "hidden by the test"))
    monkeypatch.setattr(functions, "_issued_warnings", set())
    torch.testing.assert_close(output, layer(*inputs), rtol=1e-5, atol=1e-5)


def test_module_padding_mask_zeroes_contributions():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    query, reference_points, input_flatten, spatial_shapes, level_start_index = _module_inputs(
        [(6, 6), (3, 3)]
    )
    padding_mask = torch.zeros(input_flatten.shape[:2], dtype=torch.bool)
    padding_mask[0, 20:36] = True
    padding_mask[1, 40:] = True
    # Whatever the padding pixels hold, masked output is the same...
    changed = input_flatten.masked_fill(padding_mask[..., None], 1e3)
    masked = layer(
        query, reference_points, input_flatten, spatial_shapes, level_start_index, padding_mask
    )
    masked_changed = layer(
        query, reference_points, changed, spatial_shapes, level_start_index, padding_mask
    )
    torch.testing.assert_close(masked, masked_changed)
    # ...and differs from the unmasked output, which does see them.
    unmasked = layer(query, reference_points, changed, spatial_shapes, level_start_index)
    assert not torch.allclose(masked, unmasked)


# ---------------------------------------------------------------------------------------------
# CUDA kernel (runs only where a GPU is visible)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels, channels", [(MASK2FORMER_LEVELS, 32), (NON_SQUARE_LEVELS, 40)])
def test_cuda_kernel_matches_cpu_kernel(extension, dtype, levels, channels):
    assert extension.has_cuda(), "kmax_m2f._C was built without its CUDA kernel"
    inputs = make_inputs(levels, channels=channels, dtype=dtype, queries=50)
    expected, grad_output = forward_and_gradients(MSDeformAttnFunction.apply, inputs)
    cuda_inputs = tuple(tensor.cuda() for tensor in inputs)
    actual, _ = forward_and_gradients(MSDeformAttnFunction.apply, cuda_inputs, grad_output.cuda())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert_all_close([t.cpu() for t in actual], expected, rtol=tolerance, atol=tolerance)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_half_inputs(dtype):
    """Half inputs compute in float32 and store in their dtype. The reference runs in float32 on
    the same rounded inputs: rounding a location can move it across a pixel edge, where the
    bilinear location gradient legitimately jumps."""
    inputs = make_inputs(MASK2FORMER_LEVELS, channels=32, queries=50, device="cuda")
    half_inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    rounded_inputs = tuple(t.float() if t.is_floating_point() else t for t in half_inputs)
    grad_output = torch.randn(2, 50, 2 * 32, generator=torch.Generator().manual_seed(1))  # [N, Lq, H * D]
    grad_output = grad_output.to(device="cuda", dtype=dtype)
    expected, _ = forward_and_gradients(MSDeformAttnFunction.apply, rounded_inputs, grad_output.float())
    actual, _ = forward_and_gradients(MSDeformAttnFunction.apply, half_inputs, grad_output)
    for a in actual:
        assert a.dtype == dtype
    tolerance = 1e-2 if dtype == torch.float16 else 4e-2
    assert_all_close([t.float() for t in actual], expected, rtol=tolerance, atol=tolerance)


@needs_cuda
def test_module_on_cuda_matches_cpu():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=64, n_levels=3, n_heads=2, n_points=4)
    inputs = _module_inputs(MASK2FORMER_LEVELS, d_model=64)
    expected = layer(*inputs)
    actual = layer.cuda()(*(tensor.cuda() for tensor in inputs))
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-5)
