"""Activation checkpointing: the same values, gradients and batch-norm statistics as the plain
forward pass, with fewer activations kept for backward."""
import functools
import importlib.util

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from torch import nn

import kmax_m2f
from kmax_m2f.layers.recompute import checkpointed_call
from kmax_m2f.systems.kmax_deeplab.layers import ConvBN, SingleBlock, gelu_then_convolutions, recompute_activations
from kmax_m2f.systems.kmax_deeplab.pixel_decoder import ResizedFuse, kMaXPixelDecoder
from kmax_m2f.systems.mask2former import MSDeformAttnPixelDecoder

from .conftest import REPO
from .test_kmax_pixel_decoder import TINY_ARGS, TINY_SHAPES
from .test_kmax_pixel_decoder import _features as kmax_features
from .test_mask2former_modules import SHAPES as M2F_SHAPES
from .test_mask2former_modules import _tiny_cfg as m2f_tiny_cfg


def _load_benchmark_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", REPO / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark_tool()


def _saved_bytes(model: nn.Module, run) -> tuple[object, int]:
    """(run(), bytes of the distinct non-parameter tensors autograd keeps for backward)."""
    result = []
    kept = benchmark._saved_tensor_bytes(lambda: result.append(run()), model)
    return result[0], sum(kept.values())


def _assert_same_step(plain: nn.Module, checkpointed: nn.Module, forward, max_saved_fraction: float) -> None:
    """Both modules take one training step's forward and backward from the same random state:
    equal outputs, parameter gradients and buffers (batch-norm statistics); at most
    ``max_saved_fraction`` of the saved bytes."""
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(0)
        output, saved = _saved_bytes(model, lambda: forward(model))
        output.backward()
        results.append((output.detach(), saved))
    (plain_out, plain_saved), (checkpointed_out, checkpointed_saved) = results
    torch.testing.assert_close(checkpointed_out, plain_out)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, msg=name)
    assert checkpointed_saved < max_saved_fraction * plain_saved, (checkpointed_saved, plain_saved)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Stack(nn.Module):
    def __init__(self, checkpoint: bool, through_method: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.checkpoint = checkpoint
        self.through_method = through_method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpointed_call(block.forward if self.through_method else block, x, enabled=self.checkpoint)
        return x


@pytest.mark.parametrize("through_method", [False, True], ids=["module", "method"])
def test_checkpointed_call_replays_dropout_and_updates_batch_norm_once(through_method):
    torch.manual_seed(1)
    plain = _Stack(checkpoint=False).train()
    checkpointed = _Stack(checkpoint=True, through_method=through_method).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    _assert_same_step(plain, checkpointed, lambda model: model(x).square().mean(), max_saved_fraction=0.5)
    assert all(block.layers[1].num_batches_tracked.item() == 1 for block in checkpointed.blocks)


def test_checkpointed_call_without_gradients_is_a_plain_call():
    block = _Block().eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(checkpointed_call(block, x), block(x))


class _ActivatedConvolutions(nn.Module):
    """GELU read by two convolutions, as at the start of a kMaX pixel-decoder block."""

    def __init__(self, recompute: bool) -> None:
        super().__init__()
        self.recompute = recompute
        self.first = nn.Conv2d(4, 6, 1)
        self.second = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second, activated = gelu_then_convolutions(x, (self.first, self.second, None), self.recompute)
        return first * second + activated.sum(1, keepdim=True)


def test_gelu_then_convolutions_recomputes_only_the_gelu():
    torch.manual_seed(0)
    plain, recomputing = _ActivatedConvolutions(False).double(), _ActivatedConvolutions(True).double()
    recomputing.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for model in (plain, recomputing):
        out, kept = _saved_bytes(model, lambda: model(x))
        results.append((out, kept, torch.autograd.grad(out.square().sum(), [x, *model.parameters()])))
    (plain_out, plain_kept, plain_grads), (out, kept, grads) = results
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    # Plain: x (GELU), the GELU output (convolutions) and the two convolution outputs (product);
    # recomputing, the GELU output is not kept.
    assert plain_kept - kept == x.numel() * x.element_size()
    for grad, plain_grad in zip(grads, plain_grads):
        torch.testing.assert_close(grad, plain_grad, rtol=0, atol=0)

    loss = recomputing(x).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as backward:
        loss.backward()
    ops = {event.key: event.count for event in backward.key_averages()}
    # The GELU runs again; the convolutions' outputs come from what was kept (aten::convolution
    # is still entered, but its kernel, aten::_convolution, is not).
    assert ops.get("aten::gelu", 0) > 0 and ops.get("aten::_convolution", 0) == 0


def _m2f_decoder_cfg(ffn_checkpoint: bool, layer_checkpoint: bool):
    cfg = m2f_tiny_cfg()
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1  # the recomputation must draw the same dropout masks
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_FFN_CHECKPOINT = ffn_checkpoint
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_ACTIVATION_CHECKPOINT = layer_checkpoint
    return cfg


@pytest.mark.parametrize(
    "ffn_checkpoint, layer_checkpoint, max_saved_fraction",
    # Whole layers: the FPN and the projections still keep theirs. The FFN alone: its 1024-wide
    # hidden dominates a 32-channel encoder (measured: 0.10 and 0.19 of the plain decoder's).
    [(False, True, 0.15), (True, False, 0.25), (True, True, 0.15)],
)
def test_mask2former_encoder_checkpoints_keep_the_gradients(ffn_checkpoint, layer_checkpoint, max_saved_fraction):
    torch.manual_seed(0)
    plain = MSDeformAttnPixelDecoder(_m2f_decoder_cfg(False, False), M2F_SHAPES).train()
    checkpointed = MSDeformAttnPixelDecoder(_m2f_decoder_cfg(ffn_checkpoint, layer_checkpoint), M2F_SHAPES).train()
    checkpointed.load_state_dict(plain.state_dict())
    encoder = checkpointed.transformer.encoder
    assert encoder.activation_checkpoint == layer_checkpoint
    # Inside a recomputed layer the FFN is not recomputed a second time.
    assert all(layer.feed_forward_checkpoint == (ffn_checkpoint and not layer_checkpoint) for layer in encoder.layers)
    features = {k: torch.randn(2, v.channels, 64 // v.stride, 96 // v.stride) for k, v in M2F_SHAPES.items()}

    def decoder_loss(model: MSDeformAttnPixelDecoder) -> torch.Tensor:
        mask_features, _, multi_scale = model.forward_features(features)
        return mask_features.square().mean() + sum(level.square().mean() for level in multi_scale)

    _assert_same_step(plain, checkpointed, decoder_loss, max_saved_fraction)


@pytest.mark.parametrize(
    "block_checkpoint, norm_act, max_saved_fraction",
    # Measured: 0.30 (whole blocks), 0.85 (norm outputs and the blocks' and fuses' GELUs: the
    # tiny decoder's maps are few and narrow next to its attention's), 0.22 (both: the fuses'
    # GELUs are recomputed besides the blocks).
    [(True, False, 0.35), (False, True, 0.9), (True, True, 0.26)],
)
def test_kmax_pixel_decoder_checkpoint_keeps_gradients_drop_path_and_batch_norm_statistics(
    block_checkpoint, norm_act, max_saved_fraction
):
    shapes = {
        "res2": ShapeSpec(channels=8, stride=4), "res3": ShapeSpec(channels=16, stride=8),
        "res4": ShapeSpec(channels=24, stride=16), "res5": ShapeSpec(channels=32, stride=32),
    }
    args = dict(dec_layers=[1, 2, 1, 1], dec_channels=[16, 8, 8, 4], layer_types=["axial", "axial", "bottleneck",
                "bottleneck"], drop_path_prob=0.3, spatial_shape=65, norm="BN")
    plain = kMaXPixelDecoder(shapes, **args).train()
    checkpointed = kMaXPixelDecoder(shapes, **args, activation_checkpoint=block_checkpoint).train()
    if norm_act:
        assert recompute_activations(checkpointed) > 0
        # Inside a block recomputed whole, nothing is recomputed a second time; the fuses are.
        blocks = [m for m in checkpointed.modules() if isinstance(m, SingleBlock)]
        assert all(block.recompute_input_activation != block_checkpoint for block in blocks)
        assert not (block_checkpoint and any(m.recompute_norm_act for b in blocks for m in b.modules()
                                             if isinstance(m, ConvBN)))
        assert all(fuse.recompute_input_activation for fuse in checkpointed._resized_fuses)
    checkpointed.load_state_dict(plain.state_dict())
    for model in (plain, checkpointed):
        for module in model.modules():
            if isinstance(module, SingleBlock):  # open the gamma-zero residual branches
                nn.init.ones_(module._conv3_bn.norm.weight)
    features = {k: torch.randn(2, v.channels, 65 // v.stride + 1, 65 // v.stride + 1) for k, v in shapes.items()}

    def loss(model: kMaXPixelDecoder) -> torch.Tensor:
        panoptic, _, multi_scale = model.forward_features(features)
        return panoptic.square().mean() + sum(level.square().mean() for level in multi_scale)

    _assert_same_step(plain, checkpointed, loss, max_saved_fraction)


def test_norm_activation_recompute_takes_batch_norms_that_feed_an_activation():
    model = nn.ModuleList([
        ConvBN(4, 4, 1, norm="BN", act="gelu"),
        ConvBN(4, 4, 1, norm="SyncBN", act="gelu"),  # one process: a plain batch norm
        ConvBN(4, 4, 1, norm="BN"),
        ConvBN(4, 4, 1, norm="", act="gelu"),
    ])
    assert recompute_activations(model) == 2
    assert [m.recompute_norm_act for m in model] == [True, True, False, False]


def test_norm_activation_recompute_leaves_sync_batch_norm_of_several_processes(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    model = nn.ModuleList([ConvBN(4, 4, 1, norm="BN", act="gelu"), ConvBN(4, 4, 1, norm="SyncBN", act="gelu")])
    assert recompute_activations(model) == 1
    assert [m.recompute_norm_act for m in model] == [True, False]


def test_kmax_config_switches_norm_activation_recompute():
    for enabled in (True, False):
        cfg = kmax_m2f.build_config(str(REPO / "tests/configs/tiny_kmax_panoptic.yaml"), [
            "MODEL.KMAX_DEEPLAB.NORM_ACT_CHECKPOINT", str(enabled)
        ])
        model = build_model(cfg)
        flags = [m.recompute_norm_act for m in model.modules() if isinstance(m, ConvBN)]
        assert any(flags) == enabled
        gelu_flags = [m.recompute_input_activation for m in model.modules() if isinstance(m, (SingleBlock, ResizedFuse))]
        assert gelu_flags and all(flag == enabled for flag in gelu_flags)


def test_benchmark_counts_kept_activations_by_module():
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    kept = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = _Stack(checkpoint).train()
        kept[checkpoint] = benchmark._saved_tensor_bytes(lambda: (model(x) * x).sum().backward(), model)
    # Each block's convolution input (2 x 4 x 16 x 16 floats) at least, under the block's name.
    assert kept[False]["blocks.0.layers"] >= x.numel() * 4
    assert kept[False]["(top level and loss)"] > 0  # the product with x, outside every module
    assert sum(kept[True].values()) < 0.5 * sum(kept[False].values())


def test_compare_official_memory_cases_set_existing_config_keys():
    """Every training variant compare-official names sets a key our config has to a value other
    than its default: a renamed key or a changed default would measure the default twice."""
    variants = {(system, what) for system, what, *_ in benchmark.COMPARE_CASES.values()}
    named = {case for case in variants if case[1].startswith("train-")}
    assert named == set(benchmark.OUR_CASE_OPTS)
    for (system, what), opts in benchmark.OUR_CASE_OPTS.items():
        config = str(REPO / benchmark.OUR_CONFIGS[system])
        default = kmax_m2f.build_config(config, ["MODEL.WEIGHTS", ""])
        cfg = kmax_m2f.build_config(config, ["MODEL.WEIGHTS", ""] + opts)
        for key, value in zip(opts[::2], opts[1::2]):
            lookup = functools.partial(functools.reduce, getattr, key.split("."))
            assert str(lookup(cfg)) == value != str(lookup(default)), (what, key)


def test_kmax_recompute_under_bfloat16_autocast_keeps_the_gradients():
    """The recomputation runs under the autocast state of the forward pass (checkpoint restores
    it), so mixed-precision training gets the gradients it gets without recomputing."""
    torch.manual_seed(0)
    plain = kMaXPixelDecoder(TINY_SHAPES, drop_path_prob=0.0, spatial_shape=33, norm="BN", **TINY_ARGS).train()
    recomputing = kMaXPixelDecoder(TINY_SHAPES, drop_path_prob=0.0, spatial_shape=33, norm="BN", **TINY_ARGS).train()
    recomputing.load_state_dict(plain.state_dict())
    assert recompute_activations(recomputing) > 0
    features = kmax_features(TINY_SHAPES, 33, 33)
    gradients = []
    for model in (plain, recomputing):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            panoptic, _, multi_scale = model.forward_features(features)
            loss = panoptic.float().square().mean() + sum(level.float().square().mean() for level in multi_scale)
        gradients.append(torch.autograd.grad(loss, list(model.parameters())))
    for (name, _), grad, plain_grad in zip(plain.named_parameters(), gradients[1], gradients[0]):
        torch.testing.assert_close(grad, plain_grad, msg=name)
