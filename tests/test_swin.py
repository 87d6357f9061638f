"""Swin Transformer backbone: output shapes, the shifted-window mask, checkpoint key names of the
official Mask2Former Swin-T / Swin-L, numerics against torchvision's independent Swin, gradients,
gradient checkpointing and stochastic depth."""
import re
from typing import Iterator

import pytest
import torch
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

from kmax_m2f.modeling.backbone.swin import (
    D2SwinTransformer,
    SwinTransformerBlock,
    relative_position_index,
    shifted_window_attention_mask,
)

from .conftest import backbone_cfg

TINY = dict(EMBED_DIM=32, DEPTHS=[2, 2, 2, 2], NUM_HEADS=[1, 2, 4, 8], WINDOW_SIZE=7)
SWIN_T = dict(EMBED_DIM=96, DEPTHS=[2, 2, 6, 2], NUM_HEADS=[3, 6, 12, 24], WINDOW_SIZE=7)
SWIN_L = dict(
    EMBED_DIM=192,
    DEPTHS=[2, 2, 18, 2],
    NUM_HEADS=[6, 12, 24, 48],
    WINDOW_SIZE=12,
    PRETRAIN_IMG_SIZE=384,
)


def swin_cfg(**swin_keys):
    return backbone_cfg("D2SwinTransformer", "SWIN", **swin_keys)


def build_swin(**swin_keys) -> D2SwinTransformer:
    torch.manual_seed(0)
    return build_backbone(swin_cfg(**swin_keys))


# --------------------------------------------------------------------------- shapes


def test_registered_under_the_official_name():
    assert BACKBONE_REGISTRY.get("D2SwinTransformer") is D2SwinTransformer


@pytest.mark.parametrize("height, width", [(70, 100), (64, 96)])
def test_output_shapes_strides_channels(height: int, width: int):
    model = build_swin(**TINY).eval()
    assert isinstance(model, Backbone)
    assert model.size_divisibility == 32
    shapes = model.output_shape()
    assert {name: (s.channels, s.stride) for name, s in shapes.items()} == {
        "res2": (32, 4),
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    with torch.no_grad():
        features = model(torch.randn(2, 3, height, width))
    assert list(features) == ["res2", "res3", "res4", "res5"]
    for name, feature in features.items():
        stride = shapes[name].stride
        expected = (2, shapes[name].channels, -(-height // stride), -(-width // stride))
        assert tuple(feature.shape) == expected, name
        assert torch.isfinite(feature).all()


def test_out_features_subset_and_absolute_position_embedding():
    model = build_swin(**TINY, OUT_FEATURES=["res3", "res5"], APE=True).eval()
    assert tuple(model.absolute_pos_embed.shape) == (1, 32, 56, 56)  # 224 / patch 4
    assert set(model.output_shape()) == {"res3", "res5"}
    with torch.no_grad():
        features = model(torch.randn(1, 3, 70, 100))
    assert {name: tuple(f.shape) for name, f in features.items()} == {
        "res3": (1, 64, 9, 13),
        "res5": (1, 256, 3, 4),
    }


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_swin(**TINY, OUT_FEATURES=["res6"])
    with pytest.raises(ValueError, match="NUM_HEADS"):
        build_swin(**dict(TINY, NUM_HEADS=[1, 2, 4]))


# --------------------------------------------------------------------------- shifted windows


def brute_force_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """[nW, N, N]: True where two tokens of a window of the rolled map were *not* neighbours
    the same way in the unrolled map, i.e. the cyclic shift brought them together."""
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    masks = []
    for top in range(0, padded_h, window):
        for left in range(0, padded_w, window):
            cells = [(top + r, left + c) for r in range(window) for c in range(window)]
            mask = torch.zeros(len(cells), len(cells), dtype=torch.bool)
            for i, (ri, ci) in enumerate(cells):
                for j, (rj, cj) in enumerate(cells):
                    source_dr = (ri + shift) % padded_h - (rj + shift) % padded_h
                    source_dc = (ci + shift) % padded_w - (cj + shift) % padded_w
                    mask[i, j] = (source_dr, source_dc) != (ri - rj, ci - cj)
            masks.append(mask)
    return torch.stack(masks)


@pytest.mark.parametrize(
    "height, width, window, shift", [(14, 14, 7, 3), (10, 17, 7, 3), (6, 9, 4, 2), (3, 4, 7, 3)]
)
def test_shifted_window_mask_separates_regions(height: int, width: int, window: int, shift: int):
    mask = shifted_window_attention_mask(height, width, window, shift)
    expected = brute_force_mask(height, width, window, shift)
    assert mask.shape == expected.shape
    assert torch.equal(mask != 0, expected)
    assert set(mask.unique().tolist()) <= {0.0, -100.0}


def test_shifted_block_attends_only_within_its_region():
    """Perturbing the top-left token of a 14x14 map changes, through the shifted block (window 7,
    shift 3), exactly the outputs of the 3x3 top-left corner: it shares a rolled window with the
    bottom-right tokens, but the mask keeps them apart."""
    torch.manual_seed(0)
    block = SwinTransformerBlock(
        8, 2, 7, shift_size=3, mlp_ratio=2.0, qkv_bias=True, qk_scale=None, drop=0.0,
        attn_drop=0.0, drop_path=0.0,
    ).eval()
    mask = shifted_window_attention_mask(14, 14, 7, 3)
    x = torch.randn(1, 14 * 14, 8)
    x_perturbed = x.clone()
    x_perturbed[0, 0] += torch.randn(8)  # not a constant: LayerNorm would cancel that
    with torch.no_grad():
        changed = (block(x_perturbed, 14, 14, mask) - block(x, 14, 14, mask)).abs().amax(-1)
    changed = changed.view(14, 14) > 1e-4
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[:3, :3] = True
    assert torch.equal(changed, expected)


def test_relative_position_index():
    # Window 2, tokens (0,0), (0,1), (1,0), (1,1): (dy + 1) * 3 + (dx + 1).
    assert relative_position_index(2).tolist() == [
        [4, 3, 1, 0],
        [5, 4, 2, 1],
        [7, 6, 4, 3],
        [8, 7, 5, 4],
    ]
    for window in (7, 12):
        index = relative_position_index(window)
        assert index.shape == (window**2, window**2)
        assert index.min() == 0 and index.max() == (2 * window - 1) ** 2 - 1
        assert (index.diagonal() == (window - 1) * (2 * window)).all()


# --------------------------------------------------------------------------- checkpoint names


def official_swin_keys(depths: list[int], ape: bool = False) -> Iterator[str]:
    """The state-dict keys of the official Mask2Former D2SwinTransformer (LayerNorm patch norm,
    qkv bias, out indices 0..3): parameters and the persistent relative_position_index buffer."""
    yield from ("patch_embed.proj.weight", "patch_embed.proj.bias")
    yield from ("patch_embed.norm.weight", "patch_embed.norm.bias")
    if ape:
        yield "absolute_pos_embed"
    block_keys = [
        "norm1.weight", "norm1.bias",
        "attn.relative_position_bias_table", "attn.relative_position_index",
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    for stage, depth in enumerate(depths):
        for block in range(depth):
            yield from (f"layers.{stage}.blocks.{block}.{key}" for key in block_keys)
        if stage < len(depths) - 1:
            for key in ("reduction.weight", "norm.weight", "norm.bias"):
                yield f"layers.{stage}.downsample.{key}"
    for stage in range(len(depths)):
        yield from (f"norm{stage}.weight", f"norm{stage}.bias")


SPOT_CHECKS = {
    "swin_t": {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "layers.2.blocks.5.attn.relative_position_bias_table": (169, 12),
        "layers.2.blocks.5.attn.relative_position_index": (49, 49),
        "layers.1.downsample.reduction.weight": (384, 768),
        "layers.3.blocks.1.mlp.fc1.weight": (3072, 768),
        "norm0.weight": (96,),
    },
    "swin_l": {
        "patch_embed.proj.weight": (192, 3, 4, 4),
        "layers.2.blocks.17.attn.relative_position_bias_table": ((2 * 12 - 1) ** 2, 24),
        "layers.2.blocks.17.attn.relative_position_index": (144, 144),
        "layers.0.blocks.1.attn.qkv.weight": (576, 192),
        "layers.2.downsample.reduction.weight": (1536, 3072),
        "layers.2.downsample.norm.weight": (3072,),
        "layers.3.blocks.1.mlp.fc2.weight": (1536, 6144),
        "norm3.bias": (1536,),
    },
}


def backbone_param_count_from_torchvision(keys: dict) -> int:
    """Parameters of torchvision's independent Swin of the same shape, without its classifier
    (``head``) and final ``norm``, plus the four per-stage output norms Mask2Former adds."""
    with torch.device("meta"):
        reference = TorchvisionSwin(
            patch_size=[4, 4],
            embed_dim=keys["EMBED_DIM"],
            depths=keys["DEPTHS"],
            num_heads=keys["NUM_HEADS"],
            window_size=[keys["WINDOW_SIZE"]] * 2,
        )
    count = sum(
        p.numel()
        for name, p in reference.named_parameters()
        if name.split(".")[0] not in ("head", "norm")
    )
    return count + sum(2 * keys["EMBED_DIM"] * 2**i for i in range(4))


@pytest.mark.parametrize("variant, keys", [("swin_t", SWIN_T), ("swin_l", SWIN_L)])
def test_state_dict_matches_the_official_names(variant: str, keys: dict):
    with torch.device("meta"):
        model = build_backbone(swin_cfg(**keys))
    state = model.state_dict()
    assert set(state) == set(official_swin_keys(keys["DEPTHS"]))
    for name, shape in SPOT_CHECKS[variant].items():
        assert tuple(state[name].shape) == shape, name
    assert sum(p.numel() for p in model.parameters()) == backbone_param_count_from_torchvision(keys)


def test_state_dict_with_absolute_position_embedding():
    with torch.device("meta"):
        model = build_backbone(swin_cfg(**SWIN_L, APE=True))
    state = model.state_dict()
    assert set(state) == set(official_swin_keys(SWIN_L["DEPTHS"], ape=True))
    assert tuple(state["absolute_pos_embed"].shape) == (1, 192, 96, 96)


# --------------------------------------------------------------------------- numerics


def torchvision_to_ours(name: str) -> str:
    """torchvision Swin parameter name -> official Mask2Former name."""
    if name.startswith("features.0."):  # conv, permute, LayerNorm
        return name.replace("features.0.0.", "patch_embed.proj.").replace(
            "features.0.2.", "patch_embed.norm."
        )
    name = name.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
    match = re.match(r"^features\.(\d+)\.(.*)$", name)
    index, rest = int(match.group(1)), match.group(2)
    if index % 2 == 1:  # stage (index - 1) / 2: blocks
        return f"layers.{(index - 1) // 2}.blocks.{rest}"
    return f"layers.{(index - 2) // 2}.downsample.{rest}"  # patch merging after that stage


def test_matches_torchvision_swin():
    """Same weights, same features as torchvision's Swin (an independent implementation), on a
    map where every stage is larger than a window (torchvision skips the shift otherwise) and
    res3..res5 need window padding."""
    keys = dict(EMBED_DIM=16, DEPTHS=[2, 2, 2, 2], NUM_HEADS=[1, 2, 2, 4], WINDOW_SIZE=4)
    model = build_swin(**keys, DROP_PATH_RATE=0.0).eval()
    torch.manual_seed(1)
    reference = TorchvisionSwin([4, 4], 16, [2, 2, 2, 2], [1, 2, 2, 4], [4, 4]).eval()
    ours = model.state_dict()
    for name, value in reference.state_dict().items():
        if name.split(".")[0] in ("head", "norm"):
            continue
        target = torchvision_to_ours(name)
        if target.endswith("relative_position_index"):  # torchvision stores it flattened
            assert torch.equal(ours[target].flatten(), value), target
            continue
        ours[target] = value
    model.load_state_dict(ours)

    image = torch.randn(1, 3, 176, 208)  # stages 44x52, 22x26, 11x13, 6x7
    with torch.no_grad():
        features = model(image)
        x = reference.features[0](image)
        for stage in range(4):
            x = reference.features[2 * stage + 1](x)
            expected = getattr(model, f"norm{stage}")(x).permute(0, 3, 1, 2)
            torch.testing.assert_close(features[f"res{stage + 2}"], expected, atol=1e-4, rtol=1e-4)
            if stage < 3:
                x = reference.features[2 * stage + 2](x)


def test_backward_and_gradient_checkpointing_agree():
    image = torch.randn(1, 3, 70, 100)
    grads, outputs = [], []
    for use_checkpoint in (False, True):
        model = build_swin(**TINY, DROP_PATH_RATE=0.0, USE_CHECKPOINT=use_checkpoint).train()
        features = model(image)
        loss = sum(f.square().mean() for f in features.values())
        loss.backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        outputs.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------- stochastic depth


def test_drop_path_rate_grows_linearly_over_all_blocks():
    model = build_swin(**TINY, DROP_PATH_RATE=0.3)
    rates = [block.drop_path.p for stage in model.layers for block in stage.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 8))


def test_drop_path_is_identity_in_eval_and_random_in_training():
    dropping = build_swin(**TINY, DROP_PATH_RATE=0.5)
    plain = build_swin(**TINY, DROP_PATH_RATE=0.0)
    plain.load_state_dict(dropping.state_dict())
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dropping.eval()
        plain.eval()
        for name, feature in plain(image).items():
            assert torch.equal(dropping(image)[name], feature), name
        dropping.train()
        torch.manual_seed(0)
        first = dropping(image)["res5"]
        torch.manual_seed(1)
        second = dropping(image)["res5"]
    assert not torch.allclose(first, second)
