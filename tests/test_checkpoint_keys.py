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


# --------------------------------------------------------------------------- kMaX-DeepLab

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")  # (Sync)BatchNorm


def _conv_bn(prefix: str, conv_bias: bool = False, norm: bool = True) -> Iterator[str]:
    yield f"{prefix}.conv.weight"
    if conv_bias:
        yield f"{prefix}.conv.bias"
    if norm:
        yield from (f"{prefix}.norm.{k}" for k in BN_KEYS)


def _kmax_predictor_keys(prefix: str) -> Iterator[str]:
    yield from _conv_bn(f"{prefix}._pixel_space_head_conv0bnact")
    yield from _conv_bn(f"{prefix}._pixel_space_head_conv1bnact")
    yield from _conv_bn(f"{prefix}._pixel_space_head_last_convbn", conv_bias=True)
    yield from _conv_bn(f"{prefix}._transformer_mask_head")
    yield from _conv_bn(f"{prefix}._transformer_class_head", conv_bias=True, norm=False)
    yield from (f"{prefix}._pixel_space_mask_batch_norm.{k}" for k in BN_KEYS)


def official_kmax_decoder_keys(num_layers: int = 6, semantic_decoder: bool = True) -> Iterator[str]:
    """kmax-deeplab's kMaXTransformerDecoder, derived from its module layout."""
    for layer in range(num_layers):
        prefix = f"_kmax_transformer_layers.{layer}"
        for name in ("_query_conv1_bn_act", "_pixel_conv1_bn_act", "_query_qkv_conv_bn", "_pixel_v_conv_bn",
                     "_query_conv3_bn", "_query_ffn_conv1_bn_act", "_query_ffn_conv2_bn", "_kmeans_query_conv3_bn"):
            yield from _conv_bn(f"{prefix}.{name}")
        for norm in ("_query_self_attention._batch_norm_similarity",
                     "_query_self_attention._batch_norm_retrieved_value",
                     "_kmeans_query_batch_norm_retrieved_value"):
            yield from (f"{prefix}.{norm}.{k}" for k in BN_KEYS)
        yield from _kmax_predictor_keys(f"{prefix}._predcitor")
    yield "_cluster_centers.weight"
    yield from _conv_bn("_class_embedding_projection")
    yield from _conv_bn("_mask_embedding_projection")
    yield from _kmax_predictor_keys("_predcitor")
    semantic = "_auxiliary_semantic_predictor"
    if semantic_decoder:
        for name in ("_aspp_conv0", "_aspp_conv1", "_aspp_conv2", "_aspp_conv3", "_aspp_pool", "_proj_conv_bn_act"):
            yield from _conv_bn(f"{semantic}._aspp.{name}")
        for stride in (8, 4):
            for name in ("_low_level_projection_os{}", "_low_level_fusion_os{}_conv0_bn_act",
                         "_low_level_fusion_os{}_conv1_bn_act"):
                yield from _conv_bn(f"{semantic}.{name.format(stride)}")
        yield from _conv_bn(f"{semantic}.conv_block_0")
        yield from _conv_bn(f"{semantic}.conv_block_1")
        yield from _conv_bn(f"{semantic}.final_conv", conv_bias=True, norm=False)
    else:
        yield from _conv_bn(f"{semantic}.0")
        yield from _conv_bn(f"{semantic}.1")
        yield from _conv_bn(f"{semantic}.2", conv_bias=True, norm=False)


@pytest.mark.parametrize(
    "config, backbone, semantic_decoder, queries, classes",
    [
        ("configs/coco/panoptic-segmentation/kmax_r50.yaml", "r50", True, 128, 133),
        ("configs/coco/panoptic-segmentation/kmax_convnext_large.yaml", "convnext_l", True, 128, 133),
        ("configs/cityscapes/panoptic-segmentation/kmax_r50.yaml", "r50", False, 256, 19),
    ],
    ids=["COCO-R50", "COCO-ConvNeXt-L", "Cityscapes-R50"],
)
def test_kmax_state_dict_keys_match_the_official_checkpoint(config, backbone, semantic_decoder, queries, classes):
    from .test_kmax_backbones import official_convnext_keys, official_r50_keys
    from .test_kmax_pixel_decoder import PUBLISHED_ARGS, _official_keys

    backbone_keys = official_r50_keys() if backbone == "r50" else official_convnext_keys([3, 3, 27, 3])
    in_channels = [2048, 1024, 512, 256] if backbone == "r50" else [1536, 768, 384, 192]
    expected = {f"backbone.{k}" for k in backbone_keys}
    expected |= {f"sem_seg_head.pixel_decoder.{k}" for k in _official_keys(in_channels, **PUBLISHED_ARGS)}
    expected |= {f"sem_seg_head.predictor.{k}" for k in official_kmax_decoder_keys(semantic_decoder=semantic_decoder)}
    shapes = _model_keys(config)
    assert sorted(set(shapes) - expected) == [], "unexpected keys"
    assert sorted(expected - set(shapes)) == [], "missing keys"
    predictor = "sem_seg_head.predictor"
    assert shapes[f"{predictor}._cluster_centers.weight"] == (256, queries)
    assert shapes[f"{predictor}._predcitor._transformer_class_head.conv.weight"] == (classes + 1, 256, 1)
    assert shapes[f"{predictor}._predcitor._pixel_space_head_conv0bnact.conv.weight"] == (256, 1, 5, 5)
    assert shapes[f"{predictor}._kmax_transformer_layers.0._pixel_conv1_bn_act.conv.weight"] == (256, 2048, 1, 1)
    assert shapes[f"{predictor}._kmax_transformer_layers.5._query_ffn_conv1_bn_act.conv.weight"] == (2048, 256, 1)
    assert shapes[f"{predictor}._kmax_transformer_layers.0._predcitor._pixel_space_head_last_convbn.conv.weight"] == (
        128, 256, 1, 1)
    semantic = f"{predictor}._auxiliary_semantic_predictor"
    if semantic_decoder:
        assert shapes[f"{semantic}.final_conv.conv.weight"] == (classes + 1, 256, 1, 1)
    else:
        assert shapes[f"{semantic}.2.conv.weight"] == (classes, 256, 1, 1)
