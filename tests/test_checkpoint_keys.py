"""The COCO panoptic R50 and Swin-L models have exactly the official Mask2Former state-dict keys,
so official model-zoo checkpoints load with no missing or unexpected keys.

The expected lists are generated from the official module layout (names and counts), not read
from our own model.
"""
from typing import Iterator

import pytest
import torch
from detectron2.modeling import build_model

import kmax_m2f

from .test_swin import official_swin_keys

NORM_KEYS = ("weight", "bias", "running_mean", "running_var")  # FrozenBatchNorm2d


def official_resnet_keys(blocks_per_stage=(3, 4, 6, 3)) -> Iterator[str]:
    yield "stem.conv1.weight"
    yield from (f"stem.conv1.norm.{k}" for k in NORM_KEYS)
    for stage, num_blocks in enumerate(blocks_per_stage, start=2):
        for block in range(num_blocks):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if block == 0 else [])
            for conv in convs:
                yield f"res{stage}.{block}.{conv}.weight"
                yield from (f"res{stage}.{block}.{conv}.norm.{k}" for k in NORM_KEYS)


def official_pixel_decoder_keys(enc_layers=6, levels=3) -> Iterator[str]:
    for level in range(levels):
        yield from (f"input_proj.{level}.{i}.{k}" for i in (0, 1) for k in ("weight", "bias"))
    yield "transformer.level_embed"
    for layer in range(enc_layers):
        prefix = f"transformer.encoder.layers.{layer}"
        for sub in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                    "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"):
            yield from (f"{prefix}.{sub}.weight", f"{prefix}.{sub}.bias")
    yield from ("mask_features.weight", "mask_features.bias")
    for name in ("adapter_1", "layer_1"):  # GroupNorm convs: no conv bias
        yield from (f"{name}.weight", f"{name}.norm.weight", f"{name}.norm.bias")


def official_predictor_keys(layers=9) -> Iterator[str]:
    attention = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    for layer in range(layers):
        yield from (f"transformer_self_attention_layers.{layer}.self_attn.{k}" for k in attention)
        yield from (f"transformer_cross_attention_layers.{layer}.multihead_attn.{k}" for k in attention)
        for module in ("transformer_self_attention_layers", "transformer_cross_attention_layers"):
            yield from (f"{module}.{layer}.norm.weight", f"{module}.{layer}.norm.bias")
        for sub in ("linear1", "linear2", "norm"):
            yield from (f"transformer_ffn_layers.{layer}.{sub}.weight", f"transformer_ffn_layers.{layer}.{sub}.bias")
    yield from ("decoder_norm.weight", "decoder_norm.bias", "query_feat.weight", "query_embed.weight",
                "level_embed.weight", "class_embed.weight", "class_embed.bias")
    yield from (f"mask_embed.layers.{i}.{k}" for i in range(3) for k in ("weight", "bias"))


def _model_keys(config: str) -> dict[str, tuple]:
    cfg = kmax_m2f.build_config(config, ["MODEL.DEVICE", "meta", "MODEL.WEIGHTS", ""])
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "config, backbone_keys, queries",
    [
        ("configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml", list(official_resnet_keys()), 100),
        ("configs/coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml",
         list(official_swin_keys([2, 2, 18, 2])), 200),
    ],
    ids=["R50", "Swin-L"],
)
def test_state_dict_keys_match_the_official_checkpoint(config, backbone_keys, queries):
    expected = {f"backbone.{k}" for k in backbone_keys}
    expected |= {f"sem_seg_head.pixel_decoder.{k}" for k in official_pixel_decoder_keys()}
    expected |= {f"sem_seg_head.predictor.{k}" for k in official_predictor_keys()}
    expected.add("criterion.empty_weight")
    shapes = _model_keys(config)
    assert sorted(set(shapes) - expected) == [], "unexpected keys"
    assert sorted(expected - set(shapes)) == [], "missing keys"
    assert shapes["sem_seg_head.predictor.query_feat.weight"] == (queries, 256)
    assert shapes["sem_seg_head.predictor.class_embed.weight"] == (134, 256)
    assert shapes["criterion.empty_weight"] == (134,)
    assert shapes["sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.sampling_offsets.weight"] == (
        8 * 3 * 4 * 2, 256)
