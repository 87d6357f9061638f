"""kMaX-DeepLab's pixel decoder and its shared layers (kmax_m2f.systems.kmax_deeplab.layers)."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

import kmax_m2f
from kmax_m2f.layers import LayerNorm2d
from kmax_m2f.systems.kmax_deeplab.layers import (
    MAX_SPAN,
    AxialAttention,
    AxialAttention2D,
    ConvBN,
    DepthwiseConv2d,
    RelativePositionalEncoding,
    SingleBlock,
    get_kmax_norm,
)
from kmax_m2f.systems.kmax_deeplab.pixel_decoder import ResizedFuse, kMaXPixelDecoder

TINY_SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=12, stride=8),
    "res4": ShapeSpec(channels=16, stride=16),
    "res5": ShapeSpec(channels=24, stride=32),
}
# Axial stages need key depth (= base width) divisible by the 8 heads.
TINY_ARGS = dict(
    dec_layers=[1, 2, 1, 1], dec_channels=[16, 8, 4, 4], layer_types=["axial", "axial", "bottleneck", "bottleneck"]
)
R50_SHAPES = {
    "res2": ShapeSpec(channels=256, stride=4),
    "res3": ShapeSpec(channels=512, stride=8),
    "res4": ShapeSpec(channels=1024, stride=16),
    "res5": ShapeSpec(channels=2048, stride=32),
}
PUBLISHED_ARGS = dict(
    dec_layers=[1, 5, 1, 1],
    dec_channels=[512, 256, 128, 64],
    layer_types=["axial", "axial", "bottleneck", "bottleneck"],
)


def _features(shapes, height, width, batch=2):
    """Backbone maps of an input of height x width ((n - 1) / stride + 1 for odd n)."""
    return {
        name: torch.randn(batch, s.channels, (height - 1) // s.stride + 1, (width - 1) // s.stride + 1)
        for name, s in shapes.items()
    }


def _randomize_batch_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BNs are real affine maps."""
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator))
            bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.randn(n, generator=generator))
            bn.bias.data.copy_(torch.randn(n, generator=generator))


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, channels: slice, dim: int) -> torch.Tensor:
    """Eval-mode BN restricted to some channels, applied along ``dim`` of x."""
    shape = [1] * x.dim()
    shape[dim] = -1
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps))[channels].reshape(shape)
    shift = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))[channels].reshape(shape)
    return x * scale + shift


def _naive_axis_attention(attn: AxialAttention, x: torch.Tensor, axis: str) -> torch.Tensor:
    """Full 2-D attention over all H*W positions of [N, C, H, W], masked to pairs on the same
    column (axis="height") or row (axis="width"), with the same relative-position terms."""
    n, c, h, w = x.shape
    heads, dk, dv = attn.num_heads, attn.total_key_depth // attn.num_heads, attn.total_value_depth // attn.num_heads
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    along, across = (ys, xs) if axis == "height" else (xs, ys)
    same_line = across[:, None] == across[None, :]  # [P, P] query p, key q
    table_row = along[None, :] - along[:, None] + MAX_SPAN - 1  # key position - query position

    qkv = torch.einsum("oc,ncp->nop", attn.qkv_transform.conv.weight[:, :, 0], x.reshape(n, c, h * w))
    qkv = _bn_affine(attn._batch_norm_qkv, qkv, slice(None), dim=1)
    q, k, v = qkv.split([heads * dk, heads * dk, heads * dv], dim=1)
    q, k, v = q.reshape(n, heads, dk, -1), k.reshape(n, heads, dk, -1), v.reshape(n, heads, dv, -1)
    r_q = attn._query_rpe._embeddings.weight[table_row]
    r_k = attn._key_rpe._embeddings.weight[table_row]
    r_v = attn._value_rpe._embeddings.weight[table_row]

    bn_sim = attn._batch_norm_similarity
    terms = [
        torch.einsum("nhdp,nhdq->nhpq", q, k),
        torch.einsum("nhdp,pqd->nhpq", q, r_q),
        torch.einsum("nhdq,pqd->nhpq", k, r_k),
    ]
    logits = sum(_bn_affine(bn_sim, t, slice(i * heads, (i + 1) * heads), dim=1) for i, t in enumerate(terms))
    weights = logits.masked_fill(~same_line, float("-inf")).softmax(-1)

    value = heads * dv
    content = torch.einsum("nhpq,nhdq->nhdp", weights, v).reshape(n, value, -1)
    position = torch.einsum("nhpq,pqd->nhdp", weights, r_v).reshape(n, value, -1)
    bn_out = attn._batch_norm_retrieved_output
    out = _bn_affine(bn_out, content, slice(0, value), 1) + _bn_affine(bn_out, position, slice(value, 2 * value), 1)
    return out.reshape(n, value, h, w)


@torch.no_grad()
def test_axial_attention_equals_masked_full_2d_attention():
    g = torch.Generator().manual_seed(0)
    height, width = 5, 7
    attn = AxialAttention2D(in_planes=6, query_shape=(height, width), filters=16, num_heads=4).double().eval()
    _randomize_batch_norms(attn, g)
    x = torch.randn(2, 6, height, width, generator=g, dtype=torch.float64)

    reference = _naive_axis_attention(attn._width_axis, _naive_axis_attention(attn._height_axis, x, "height"), "width")
    out = attn(x)
    assert out.shape == (2, 32, height, width)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    # The positional terms matter: without them the result changes.
    for rpe in (attn._height_axis._query_rpe, attn._width_axis._value_rpe):
        rpe._embeddings.weight.zero_()
    assert not torch.allclose(attn(x), reference)


def test_relative_position_encoding_shapes_and_indexing_for_odd_sizes():
    rpe = RelativePositionalEncoding(41, 41, 4)
    table = rpe._embeddings.weight
    assert table.shape == (2 * MAX_SPAN - 1, 4)
    encodings = rpe()
    assert encodings.shape == (41, 41, 4)
    torch.testing.assert_close(encodings[3, 10], table[MAX_SPAN - 1 + 7])  # key 7 to the right
    torch.testing.assert_close(encodings[40, 0], table[MAX_SPAN - 1 - 40])
    assert "_relative_distance_matrix" not in rpe.state_dict()  # not in official checkpoints
    assert RelativePositionalEncoding(MAX_SPAN, MAX_SPAN, 2)().shape == (MAX_SPAN, MAX_SPAN, 2)
    with pytest.raises(ValueError, match="maximum relative span"):
        RelativePositionalEncoding(MAX_SPAN + 1, MAX_SPAN + 1, 2)


@pytest.mark.parametrize(
    "spatial_shape, stride32, stride16",
    [((1281, 1281), (41, 41), (81, 81)), ((1025, 2049), (33, 65), (65, 129)), (641, (21, 21), (41, 41))],
)
def test_decoder_sizes_its_relative_encodings_from_the_fixed_input_size(spatial_shape, stride32, stride16):
    decoder = kMaXPixelDecoder(TINY_SHAPES, drop_path_prob=0.0, spatial_shape=spatial_shape, **TINY_ARGS)
    for stage, (height, width) in ((0, stride32), (1, stride16)):
        attention = decoder._stages[stage]._blocks[0]._attention
        key_depth = TINY_ARGS["dec_channels"][stage] // 8
        assert attention._height_axis._query_rpe().shape == (height, height, key_depth)
        assert attention._width_axis._key_rpe().shape == (width, width, key_depth)
        assert attention._width_axis._value_rpe().shape == (width, width, 2 * key_depth)


def test_decoder_output_shapes_on_a_non_square_fixed_size():
    height, width = 65, 97
    decoder = kMaXPixelDecoder(TINY_SHAPES, drop_path_prob=0.0, spatial_shape=(height, width), **TINY_ARGS)
    features = _features(TINY_SHAPES, height, width)
    panoptic, semantic, multi_scale = decoder.forward_features(features)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 64, 3, 4), (2, 32, 5, 7), (2, 16, 9, 13)]
    assert panoptic.shape == (2, 16, 17, 25)
    # The auxiliary semantic head reads the raw backbone maps at strides 32, 8, 4.
    assert [f is features[name] for f, name in zip(semantic, ["res5", "res3", "res2"])] == [True] * 3

    with pytest.raises(ValueError, match="INPUT.IMAGE_SIZE"):
        decoder.forward_features(_features(TINY_SHAPES, 97, 97))


@torch.no_grad()
def test_decoder_runs_under_mixed_precision():
    decoder = kMaXPixelDecoder(TINY_SHAPES, drop_path_prob=0.0, spatial_shape=65, **TINY_ARGS).eval()
    features = _features(TINY_SHAPES, 65, 65)
    reference, _, _ = decoder.forward_features(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        panoptic, _, multi_scale = decoder.forward_features(features)
        assert decoder._in_norms[0](features["res5"].bfloat16()).dtype == torch.float32
    assert all(torch.isfinite(f).all() for f in [panoptic, *multi_scale])
    torch.testing.assert_close(panoptic.float(), reference, rtol=0.1, atol=0.1)


def test_decoder_rejects_inconsistent_stage_lists():
    with pytest.raises(ValueError, match="one entry per input"):
        kMaXPixelDecoder(TINY_SHAPES, drop_path_prob=0.0, spatial_shape=65, **{**TINY_ARGS, "dec_layers": [1, 1, 1]})


@pytest.mark.parametrize("block_type, inplanes", [("axial", 12), ("bottleneck", 32)])
def test_gamma_zero_makes_residual_blocks_start_as_their_shortcut(block_type, inplanes):
    block = SingleBlock(inplanes, (16, 8, 32), block_type, query_shape=(5, 6), drop_path_prob=0.2)
    assert torch.all(block._conv3_bn.norm.weight == 0)
    assert (block._shortcut is None) == (inplanes == 32)
    x = torch.randn(2, inplanes, 5, 6)
    for training in (True, False):
        block.train(training)
        expected = F.gelu(x) if block._shortcut is None else block._shortcut(F.gelu(x))
        torch.testing.assert_close(block(x), expected)


def test_only_residual_branch_ends_start_with_gamma_zero():
    decoder = kMaXPixelDecoder(TINY_SHAPES, drop_path_prob=0.0, spatial_shape=65, **TINY_ARGS)
    for name, module in decoder.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.eps == 1e-3 and module.momentum == 0.01, name
            expected = 0.0 if name.endswith("_conv3_bn.norm") else 1.0
            assert torch.all(module.weight == expected), name


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    decoder = kMaXPixelDecoder(TINY_SHAPES, drop_path_prob=0.0, spatial_shape=65, norm="BN", **TINY_ARGS).train()
    # With gamma 0 the residual bodies get zero gradients at init; open them to see every path.
    for module in decoder.modules():
        if isinstance(module, SingleBlock):
            nn.init.ones_(module._conv3_bn.norm.weight)
    panoptic, _, multi_scale = decoder.forward_features(_features(TINY_SHAPES, 65, 65))
    loss = panoptic.square().mean() + sum(f.square().mean() for f in multi_scale)
    loss.backward()
    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_drop_path_drops_whole_residual_branches_per_sample_in_training_only():
    torch.manual_seed(0)
    block = SingleBlock(32, (8, 8, 32), "bottleneck", query_shape=(4, 4), drop_path_prob=0.5)
    nn.init.ones_(block._conv3_bn.norm.weight)
    x = torch.randn(16, 32, 4, 4)
    dropped = (block(x) == F.gelu(x)).flatten(1).all(1)
    assert 0 < dropped.sum() < 16
    block.eval()
    torch.testing.assert_close(block(x), block(x))
    assert not (block(x) == F.gelu(x)).flatten(1).all(1).any()


def test_resized_fuse_uses_align_corners_for_odd_sizes_only():
    fuse = ResizedFuse(low_in_channels=4, high_in_channels=4, out_channels=4)  # no projections
    assert not hasattr(fuse, "_conv_bn_low") and not hasattr(fuse, "_conv_bn_high")
    low, high = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 5, 5)
    upsampled = fuse(low, high) - high
    # TF grid: fine pixel 2 * i is exactly coarse pixel i.
    torch.testing.assert_close(upsampled[..., ::2, ::2], low)
    low, high = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 8, 8)
    expected = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fuse(low, high) - high, expected)


def test_shared_layers_follow_tf_conventions():
    assert isinstance(get_kmax_norm("SyncBN", 8), nn.SyncBatchNorm)
    assert isinstance(get_kmax_norm("BN", 8, ndim=1), nn.BatchNorm1d)
    assert isinstance(get_kmax_norm("", 8), nn.Identity)
    with pytest.raises(ValueError):
        get_kmax_norm("GN", 8)
    conv = ConvBN(16, 8, 1, ndim=1, bias=True, norm="", act="gelu")
    assert set(conv.state_dict()) == {"conv.weight", "conv.bias"}
    assert conv(torch.randn(2, 16, 5)).shape == (2, 8, 5)
    # Channels-first LayerNorm equals nn.LayerNorm over C on the channels-last view.
    norm = LayerNorm2d(6)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 3, 4)
    reference = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), reference)


@pytest.mark.parametrize("autocast", [False, True])
def test_layer_norm_2d_same_values_and_gradients_in_both_layouts_and_keeps_the_layout(autocast):
    torch.manual_seed(0)
    norm = LayerNorm2d(6)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 5, 7)
    outputs, input_grads, parameter_grads = [], [], []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x_in = x.clone().to(memory_format=memory_format).requires_grad_()
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = norm(x_in.to(torch.bfloat16) if autocast else x_in)
        assert y.dtype == torch.float32
        assert y.is_contiguous(memory_format=memory_format)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y)
        input_grads.append(x_in.grad)
        parameter_grads.append([norm.weight.grad.clone(), norm.bias.grad.clone()])
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(input_grads[1], input_grads[0])
    torch.testing.assert_close(parameter_grads[1], parameter_grads[0])


@pytest.mark.parametrize("autocast", [False, True])
def test_depthwise_conv_matches_nn_conv2d_in_value_gradient_and_layout(autocast):
    torch.manual_seed(0)
    depthwise = DepthwiseConv2d(6, 5, padding=2, bias=True)
    reference = nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=True)
    reference.load_state_dict(depthwise.state_dict())
    x = torch.randn(2, 6, 9, 7)
    outputs, grads = [], []
    for conv in (depthwise, reference):
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            previous_layer_output = x_in.to(torch.bfloat16) if autocast else x_in * 1.0
            previous_layer_output.register_hook(grads.append)
            y = conv(previous_layer_output)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y)
        grads += [conv.weight.grad, conv.bias.grad]
    # Same dtype and NCHW memory as nn.Conv2d's output and input gradient, so that the layers
    # around it run as they would around nn.Conv2d (a channels-last gradient slows a batch norm's
    # backward pass 3x).
    assert outputs[0].dtype == outputs[1].dtype and outputs[0].is_contiguous()
    assert grads[0].dtype == grads[3].dtype and grads[0].is_contiguous()
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0].float(), outputs[1].float(), **tolerance)
    for grad, expected in zip(grads[:3], grads[3:]):
        torch.testing.assert_close(grad.float(), expected.float(), **tolerance)


def test_depthwise_conv_keeps_float64():
    conv = DepthwiseConv2d(4, 3, padding=1).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    reference = F.conv2d(x, conv.weight, conv.bias, padding=1, groups=4)
    assert conv(x).dtype == torch.float64
    torch.testing.assert_close(conv(x), reference)


def test_conv_bn_uses_the_depthwise_conv_with_nn_conv2d_parameter_names():
    depthwise = ConvBN(8, 8, 5, padding=2, groups=8, norm="BN")
    assert type(depthwise.conv) is DepthwiseConv2d
    assert set(depthwise.state_dict()) == set(ConvBN(8, 8, 5, padding=2, groups=2, norm="BN").state_dict())
    assert depthwise.conv.weight.shape == (8, 1, 5, 5)
    assert type(ConvBN(8, 16, 5, padding=2, groups=8, norm="BN").conv) is nn.Conv2d
    assert type(ConvBN(8, 8, 1, ndim=1, groups=8, norm="").conv) is nn.Conv1d


def _official_keys(in_channels, dec_channels, dec_layers, layer_types):
    """State-dict keys of the official kMaXPixelDecoder, derived from its structure."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]

    def conv_bn(prefix):
        return [f"{prefix}.conv.weight"] + [f"{prefix}.norm.{k}" for k in bn]

    keys = []
    for i, channels in enumerate(in_channels):
        keys += [f"_in_norms.{i}.weight", f"_in_norms.{i}.bias"]
        for j in range(dec_layers[i]):
            block = f"_stages.{i}._blocks.{j}"
            inplanes = (in_channels[0] if i == 0 else dec_channels[i]) if j == 0 else 4 * dec_channels[i]
            keys += conv_bn(f"{block}._conv1_bn_act") + conv_bn(f"{block}._conv3_bn")
            if inplanes != 4 * dec_channels[i]:
                keys += conv_bn(f"{block}._shortcut")
            if layer_types[i] == "bottleneck":
                keys += conv_bn(f"{block}._conv2_bn_act")
                continue
            for axis in ("_height_axis", "_width_axis"):
                attn = f"{block}._attention.{axis}"
                keys += [f"{attn}.qkv_transform.conv.weight"]
                keys += [f"{attn}.{rpe}._embeddings.weight" for rpe in ("_query_rpe", "_key_rpe", "_value_rpe")]
                for norm in ("_batch_norm_qkv", "_batch_norm_similarity", "_batch_norm_retrieved_output"):
                    keys += [f"{attn}.{norm}.{k}" for k in bn]
        if i > 0:
            keys += conv_bn(f"_resized_fuses.{i - 1}._conv_bn_low")
            if channels != dec_channels[i]:
                keys += conv_bn(f"_resized_fuses.{i - 1}._conv_bn_high")
    return set(keys)


def test_published_r50_decoder_has_the_official_state_dict_keys_and_shapes():
    # Meta tensors: the names and shapes of the full-size model without its 21M parameters' init.
    with torch.device("meta"):
        decoder = kMaXPixelDecoder(R50_SHAPES, drop_path_prob=0.0, spatial_shape=(1281, 1281), **PUBLISHED_ARGS)
    state = decoder.state_dict()
    assert set(state) == _official_keys([2048, 1024, 512, 256], **PUBLISHED_ARGS)
    assert "_stages.0._blocks.0._shortcut.conv.weight" not in state  # 2048 in == 4 x 512 out
    shapes = {
        "_stages.0._blocks.0._conv1_bn_act.conv.weight": (1024, 2048, 1, 1),
        "_stages.0._blocks.0._attention._height_axis.qkv_transform.conv.weight": (2048, 1024, 1),
        "_stages.0._blocks.0._attention._width_axis.qkv_transform.conv.weight": (2048, 1024, 1),
        "_stages.0._blocks.0._attention._height_axis._query_rpe._embeddings.weight": (509, 64),
        "_stages.0._blocks.0._attention._height_axis._value_rpe._embeddings.weight": (509, 128),
        "_stages.0._blocks.0._attention._width_axis._batch_norm_similarity.weight": (24,),
        "_stages.0._blocks.0._attention._width_axis._batch_norm_retrieved_output.weight": (2048,),
        "_stages.0._blocks.0._conv3_bn.conv.weight": (2048, 1024, 1, 1),
        "_stages.1._blocks.0._shortcut.conv.weight": (1024, 256, 1, 1),
        "_stages.1._blocks.4._attention._width_axis._key_rpe._embeddings.weight": (509, 32),
        "_stages.2._blocks.0._conv2_bn_act.conv.weight": (128, 128, 3, 3),
        "_stages.3._blocks.0._conv3_bn.norm.weight": (256,),
        "_resized_fuses.0._conv_bn_low.conv.weight": (256, 2048, 1, 1),
        "_resized_fuses.0._conv_bn_high.conv.weight": (256, 1024, 1, 1),
        "_resized_fuses.2._conv_bn_high.norm.running_var": (64,),
        "_in_norms.0.weight": (2048,),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_builds_from_config_with_the_official_keys():
    cfg = kmax_m2f.build_config("", ["MODEL.DEVICE", "cpu"])
    dec = cfg.MODEL.KMAX_DEEPLAB.PIXEL_DEC
    assert dec.NAME == "kMaXPixelDecoder"
    dec.IN_FEATURES = list(TINY_SHAPES)
    dec.DEC_LAYERS = TINY_ARGS["dec_layers"]
    dec.DEC_CHANNELS = TINY_ARGS["dec_channels"]
    dec.LAYER_TYPES = TINY_ARGS["layer_types"]
    cfg.INPUT.IMAGE_SIZE = [65, 65]
    decoder = SEM_SEG_HEADS_REGISTRY.get(dec.NAME)(cfg, {**TINY_SHAPES, "stem": ShapeSpec(channels=4, stride=2)})
    assert decoder.in_features == ["res5", "res4", "res3", "res2"]
    assert decoder.spatial_shape == (65, 65)
    panoptic, _, _ = decoder.forward_features(_features(TINY_SHAPES, 65, 65))
    assert panoptic.shape == (2, 16, 17, 17)
