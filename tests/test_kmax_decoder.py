"""kMaX-DeepLab's transformer decoder, head and meta-architecture pieces (no training here)."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.structures import Instances

import kmax_m2f
from kmax_m2f.systems.kmax_deeplab.meta_arch import kMaXDeepLab, masks_to_image
from kmax_m2f.systems.kmax_deeplab.transformer_decoder import (
    kMaXPredictor,
    kMaXTransformerDecoder,
    kMaXTransformerLayer,
    kmeans_cross_attention,
    resize_aux_outputs,
    void_prior_bias,
)

BACKBONE_SHAPES = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=32, stride=8),
    "res4": ShapeSpec(channels=64, stride=16),
    "res5": ShapeSpec(channels=128, stride=32),
}
TINY_DECODER = dict(
    dec_layers=[1, 2, 1], in_channels=[64, 32, 16, 8], num_classes=5, num_queries=7, drop_path_prob=0.0,
    add_aux_semantic_pred=True, use_aux_semantic_decoder=True, input_shape_from_backbone=BACKBONE_SHAPES,
    hidden_dim=32, dim_feedforward=64, num_heads=4, norm="BN",
)


def _decoder_inputs(batch=2, sizes=(3, 5, 9, 17)):
    torch.manual_seed(0)
    multi_scale = [torch.randn(batch, c, s, s) for c, s in zip((64, 32, 16), sizes[:3])]
    panoptic = torch.randn(batch, 8, sizes[3], sizes[3])
    semantic = [torch.randn(batch, 128, sizes[0], sizes[0]), torch.randn(batch, 32, sizes[2], sizes[2]),
                torch.randn(batch, 16, sizes[3], sizes[3])]
    return multi_scale, panoptic, semantic


# --------------------------------------------------------------------------- k-means attention

def test_kmeans_cross_attention_equals_the_one_hot_argmax_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 30)
    values = torch.randn(2, 8, 30)
    expected = torch.zeros(2, 8, 5)
    for b in range(2):
        for pixel in range(30):
            best = int(logits[b, :, pixel].argmax())
            expected[b, :, best] += values[b, :, pixel]
    update = kmeans_cross_attention(logits, values)
    torch.testing.assert_close(update, expected)
    # Not the softmax (over pixels) of standard cross-attention, nor its softmax-over-clusters variant.
    softmax_pixels = torch.einsum("bnm,bcm->bcn", logits.softmax(-1), values)
    softmax_clusters = torch.einsum("bnm,bcm->bcn", logits.softmax(1), values)
    assert not torch.allclose(update, softmax_pixels, atol=1e-2)
    assert not torch.allclose(update, softmax_clusters, atol=1e-2)


def test_kmeans_assignment_carries_no_gradient_but_values_do():
    logits = torch.randn(1, 4, 12, requires_grad=True)
    values = torch.randn(1, 3, 12, requires_grad=True)
    kmeans_cross_attention(logits, values).sum().backward()
    assert logits.grad is None
    assert values.grad is not None and torch.equal(values.grad, torch.ones_like(values))


def test_kmeans_update_is_float32_under_autocast():
    logits = torch.randn(1, 4, 12)
    values = torch.randn(1, 3, 12).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kmeans_cross_attention(logits, values).dtype == torch.float32


def test_void_prior_bias_gives_void_the_prior_probability():
    bias = void_prior_bias(134)
    assert bias[:-1].abs().sum() == 0
    assert bias[-1] == pytest.approx(math.log(133 * 0.9 / 0.1))
    assert bias.softmax(0)[-1] == pytest.approx(0.9)


def test_predictor_starts_void_biased_with_small_cosine_mask_logits():
    predictor = kMaXPredictor(8, 16, num_classes=6, hidden_dim=16, mask_dim=4, norm="BN").eval()
    queries = torch.randn(2, 16, 7)
    with torch.no_grad():
        out = predictor(queries, queries, torch.randn(2, 8, 5, 5))
    assert out["class_logits"].shape == (2, 7, 6)
    assert out["mask_logits"].shape == (2, 7, 5, 5)
    # The class head starts near zero: void gets ~0.9 of the probability.
    assert out["class_logits"].softmax(-1)[..., -1].mean() == pytest.approx(0.9, abs=0.02)
    torch.testing.assert_close(out["pixel_feature"].norm(dim=1), torch.ones(2, 5, 5))
    # Eval-mode BN with fresh statistics is gamma * x: mask logits are 0.1 x <unit pixel, kernel>.
    with torch.no_grad():
        kernels = predictor._transformer_mask_head(queries)
    expected = 0.1 * torch.einsum("bchw,bcn->bnhw", out["pixel_feature"], kernels) / math.sqrt(1 + 1e-3)
    torch.testing.assert_close(out["mask_logits"], expected, rtol=1e-4, atol=1e-5)


def test_layer_prediction_is_made_before_its_update_and_residual_ends_start_at_zero():
    layer = kMaXTransformerLayer(6, in_channel_pixel=12, in_channel_query=32, base_filters=16, num_heads=4,
                                 dim_feedforward=64, norm="BN").eval()
    for name in ("_kmeans_query_conv3_bn", "_query_conv3_bn", "_query_ffn_conv2_bn"):
        assert torch.all(getattr(layer, name).norm.weight == 0)
    queries = torch.randn(2, 32, 7)
    with torch.no_grad():
        updated, prediction = layer(torch.randn(2, 12, 6, 6), queries)
    # With every residual branch at zero the update is GELU(GELU(C)).
    torch.testing.assert_close(updated, F.gelu(F.gelu(queries)))
    assert prediction["mask_logits"].shape == (2, 7, 6, 6)


# --------------------------------------------------------------------------- decoder

def test_decoder_outputs_and_auxiliary_predictions_at_their_strides():
    decoder = kMaXTransformerDecoder(**TINY_DECODER).train()
    out = decoder(*_decoder_inputs())
    assert out["pred_logits"].shape == (2, 7, 6)
    assert out["pred_masks"].shape == (2, 7, 17, 17)
    assert out["pixel_feature"].shape == (2, 16, 17, 17)
    assert [aux["pred_masks"].shape[-1] for aux in out["aux_outputs"]] == [3, 5, 5, 9]
    assert out["aux_semantic_pred"].shape == (2, 6, 17, 17)
    resized = resize_aux_outputs(out, (17, 17))
    assert all(aux["pred_masks"].shape == (2, 7, 17, 17) for aux in resized)
    assert all(aux["pixel_feature"].shape == (2, 16, 17, 17) for aux in resized)
    # Odd sizes upsample on the align-corners grid: coarse pixels land exactly on fine ones.
    torch.testing.assert_close(resized[0]["pred_masks"][..., ::8, ::8], out["aux_outputs"][0]["pred_masks"])


def test_semantic_head_runs_in_training_only_and_light_head_has_k_outputs():
    decoder = kMaXTransformerDecoder(**TINY_DECODER).eval()
    assert "aux_semantic_pred" not in decoder(*_decoder_inputs())
    light = kMaXTransformerDecoder(**{**TINY_DECODER, "use_aux_semantic_decoder": False}).train()
    assert light(*_decoder_inputs())["aux_semantic_pred"].shape == (2, 5, 3, 3)


def test_semantic_decoder_width_is_configurable_and_defaults_to_the_official_256():
    cfg = kmax_m2f.build_config(opts=["MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_DECODER_CHANNELS", "24"])
    args = kMaXTransformerDecoder.from_config(cfg, BACKBONE_SHAPES)
    assert args["aux_semantic_decoder_channels"] == 24
    narrow = kMaXTransformerDecoder(**{**TINY_DECODER, "aux_semantic_decoder_channels": 24}).train()
    head = narrow._auxiliary_semantic_predictor
    assert head._aspp._aspp_conv0.conv.out_channels == 24
    assert head.conv_block_0.conv.weight.shape == (24, 1, 5, 5)
    assert narrow(*_decoder_inputs())["aux_semantic_pred"].shape == (2, 6, 17, 17)
    official = kMaXTransformerDecoder(**TINY_DECODER)._auxiliary_semantic_predictor
    assert official._aspp._aspp_conv0.conv.out_channels == 256


def test_cluster_centres_have_the_official_layout_and_backward_reaches_every_parameter():
    decoder = kMaXTransformerDecoder(**TINY_DECODER).train()
    assert decoder._cluster_centers.weight.shape == (32, 7)
    out = decoder(*_decoder_inputs())
    loss = out["pred_logits"].sum() + out["pred_masks"].sum() + out["aux_semantic_pred"].sum()
    loss = loss + sum(aux["pred_masks"].sum() + aux["pred_logits"].sum() for aux in out["aux_outputs"])
    loss.backward()
    no_grad = [n for n, p in decoder.named_parameters() if p.grad is None]
    assert no_grad == []


def test_decoder_rejects_bad_lists_and_missing_backbone_features():
    with pytest.raises(ValueError, match="DEC_LAYERS needs 3 entries"):
        kMaXTransformerDecoder(**{**TINY_DECODER, "dec_layers": [2, 2]})
    with pytest.raises(ValueError, match="'res3'"):
        shapes = {k: v for k, v in BACKBONE_SHAPES.items() if k != "res3"}
        kMaXTransformerDecoder(**{**TINY_DECODER, "input_shape_from_backbone": shapes})


# --------------------------------------------------------------------------- meta-architecture


@pytest.mark.parametrize("padded, real, output", [((33, 33), (25, 33), (50, 66)), ((32, 48), (30, 41), (45, 60))])
def test_masks_to_image_equals_the_official_upsample_crop_resize(padded, real, output):
    torch.manual_seed(0)
    stride4 = tuple(s // 4 + s % 2 for s in padded)
    logits = torch.randn(20, *stride4)  # more queries than one upsampling chunk
    align = padded[1] % 2 == 1
    full = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=align)
    expected = F.interpolate(full[..., : real[0], : real[1]], size=output, mode="bilinear", align_corners=align)[0]
    torch.testing.assert_close(masks_to_image(logits, real, padded, output), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_kmax(synthetic_prefix):
    cfg = kmax_m2f.build_config(
        "configs/synthetic/panoptic-segmentation/kmax_R18_synthetic.yaml",
        ["INPUT.IMAGE_SIZE", "[64, 64]", "MODEL.KMAX_DEEPLAB.TRANS_DEC.HIDDEN_DIM", "32",
         "MODEL.KMAX_DEEPLAB.TRANS_DEC.DIM_FEEDFORWARD", "32", "MODEL.KMAX_DEEPLAB.TRANS_DEC.NUM_HEADS", "4",
         "MODEL.KMAX_DEEPLAB.TRANS_DEC.NUM_OBJECT_QUERIES", "6",
         # The official decoder depth (the quick-start config runs one layer per stride).
         "MODEL.KMAX_DEEPLAB.TRANS_DEC.DEC_LAYERS", "[2, 2, 2]"],
    )
    return kMaXDeepLab(cfg), cfg


def test_preprocess_pads_to_the_fixed_size_and_zeroes_marked_padding(tiny_kmax):
    model, _ = tiny_kmax
    image = torch.full((3, 40, 50), 200, dtype=torch.uint8)
    real = torch.ones(40, 50, dtype=torch.bool)
    real[:, 45:] = False
    images = model.preprocess_image([{"image": image, "is_real_pixels": real}])
    assert images.tensor.shape == (1, 3, 64, 64) and images.image_sizes == [(40, 50)]
    expected = (200 - 127.5) / 127.5
    assert torch.allclose(images.tensor[0, :, :40, :45], torch.tensor(expected))
    assert images.tensor[0, :, :, 45:].abs().sum() == 0 and images.tensor[0, :, 40:].abs().sum() == 0
    with pytest.raises(ValueError, match="exceeds the fixed input size INPUT.IMAGE_SIZE=64x64"):
        model.preprocess_image([{"image": torch.zeros(3, 65, 10, dtype=torch.uint8)}])


def test_prepare_targets_checks_the_stride_and_derives_semantics_from_masks(tiny_kmax):
    model, _ = tiny_kmax
    instances = Instances((64, 64))
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 8:, 8:] = True
    instances.gt_masks = masks
    instances.gt_classes = torch.tensor([3, 6])
    (target,) = model.prepare_targets([{"instances": instances}], (16, 16))
    assert target["masks"].dtype == torch.float32
    assert (target["semantic_masks"][:4] == 3).all() and (target["semantic_masks"][8:, 8:] == 6).all()
    assert (target["semantic_masks"][5:8] == 255).all()
    with pytest.raises(ValueError, match="INPUT.DATASET_MAPPER_NAME kmax_panoptic"):
        model.prepare_targets([{"instances": instances}], (17, 17))


def test_inference_returns_results_at_the_requested_size_and_cluster_maps(tiny_kmax):
    model, _ = tiny_kmax
    model.eval()
    inputs = [{"image": torch.randint(0, 255, (3, 64, 48), dtype=torch.uint8), "height": 128, "width": 96}]
    with torch.no_grad():
        (result,) = model.inference(inputs, return_cluster_assignments=True)
    panoptic, segments = result["panoptic_seg"]
    assert panoptic.shape == (128, 96)
    assert result["sem_seg"].shape == (8, 128, 96)
    assert result["instances"].image_size == (128, 96)
    maps = result["cluster_assignments"]
    # 6 kMaX layers at strides 32, 32, 16, 16, 8, 8 and the final stride-4 prediction, cropped to 64x48.
    assert [tuple(m.shape) for m in maps] == [(2, 2), (2, 2), (4, 3), (4, 3), (8, 6), (8, 6), (16, 12)]
    assert all(m.dtype == torch.int64 and int(m.max()) < 6 for m in maps)


def test_aspp_trains_with_one_image_and_matches_the_pooled_normalisation():
    """The official port fails at batch 1 (BN on a 1x1 pooled map); normalising the broadcast map
    keeps the batch statistics of the pooled one."""
    from kmax_m2f.systems.kmax_deeplab.semantic_decoder import ASPP

    torch.manual_seed(0)
    aspp = ASPP(8, 4, (1, 2, 3), norm="BN").train()
    aspp._proj_drop.p = 0.0
    aspp(torch.randn(1, 8, 5, 5)).sum().backward()
    x = torch.randn(3, 8, 5, 5)
    pooled = aspp._aspp_pool(aspp._avg_pool(x))  # the official order: BN over the 1x1 maps
    broadcast = aspp._aspp_pool.act(aspp._aspp_pool.norm(aspp._aspp_pool.conv(aspp._avg_pool(x)).expand(-1, -1, 5, 5)))
    torch.testing.assert_close(broadcast, pooled.expand(-1, -1, 5, 5), rtol=1e-4, atol=1e-5)
