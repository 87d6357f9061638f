"""Mask2Former's pixel decoder, masked-attention decoder and post-processing."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess

import kmax_m2f
from kmax_m2f.modeling.postprocess import resize_to_output
from kmax_m2f.systems.mask2former import MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder
from kmax_m2f.systems.mask2former.postprocess import instance_inference, panoptic_inference, semantic_inference
from kmax_m2f.systems.mask2former.transformer_decoder import CrossAttentionLayer, masked_attention_mask

SHAPES = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=24, stride=8),
    "res4": ShapeSpec(channels=40, stride=16),
    "res5": ShapeSpec(channels=48, stride=32),
}


def _tiny_cfg():
    cfg = kmax_m2f.build_config("", ["MODEL.DEVICE", "cpu"])
    head = cfg.MODEL.SEM_SEG_HEAD
    head.IN_FEATURES = list(SHAPES)
    head.CONVS_DIM = head.MASK_DIM = 32
    head.NORM = "GN"
    head.NUM_CLASSES = 5
    head.TRANSFORMER_ENC_LAYERS = 2
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 32
    cfg.MODEL.MASK_FORMER.NHEADS = 4
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 64
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 7
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 4
    return cfg


def test_pixel_decoder_shapes_on_a_non_square_input():
    decoder = MSDeformAttnPixelDecoder(_tiny_cfg(), SHAPES)
    features = {k: torch.randn(2, v.channels, 96 // v.stride, 160 // v.stride) for k, v in SHAPES.items()}
    mask_features, coarsest, multi_scale = decoder.forward_features(features)
    assert mask_features.shape == (2, 32, 24, 40)
    assert coarsest.shape == (2, 32, 3, 5)
    assert [tuple(f.shape[-2:]) for f in multi_scale] == [(3, 5), (6, 10), (12, 20)]
    mask_features.sum().backward()
    assert all(p.grad is not None for p in decoder.parameters())


def test_pixel_decoder_names_match_the_official_layout():
    names = set(dict(MSDeformAttnPixelDecoder(_tiny_cfg(), SHAPES).named_parameters()))
    for expected in [
        "input_proj.0.0.weight", "input_proj.2.1.bias", "transformer.level_embed",
        "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.linear2.bias", "transformer.encoder.layers.0.norm2.weight",
        "mask_features.weight", "adapter_1.weight", "adapter_1.norm.weight", "layer_1.weight", "layer_1.norm.bias",
    ]:
        assert expected in names, expected


def test_decoder_predicts_after_every_layer():
    cfg = _tiny_cfg()
    decoder = MultiScaleMaskedTransformerDecoder(cfg, 32, True)
    multi_scale = [torch.randn(2, 32, s, s) for s in (2, 4, 8)]
    out = decoder(multi_scale, torch.randn(2, 32, 16, 16))
    assert out["pred_logits"].shape == (2, 7, 6)
    assert out["pred_masks"].shape == (2, 7, 16, 16)
    assert len(out["aux_outputs"]) == cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1


def test_attention_mask_blocks_outside_the_mask_and_frees_empty_queries():
    logits = torch.full((1, 2, 4, 4), -10.0)
    logits[0, 0, :2, :2] = 10.0  # query 0 predicts the top-left quarter; query 1 predicts nothing
    blocked = masked_attention_mask(logits, (4, 4), num_heads=3)
    assert blocked.shape == (3, 2, 16)
    assert (~blocked[:, 0].view(3, 4, 4)[:, :2, :2]).all() and blocked[:, 0].sum() == 3 * 12
    assert not blocked[:, 1].any(), "a query with an empty mask attends everywhere"


def test_masked_positions_get_zero_weight():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(d_model=8, nhead=2).eval()
    queries = torch.randn(2, 1, 8)  # [Q, B, C]
    memory = torch.randn(6, 1, 8)  # [HW, B, C]
    blocked = torch.zeros(2, 2, 6, dtype=torch.bool)  # [B * heads, Q, HW]
    blocked[:, 0, 3:] = True  # query 0 may only see pixels 0..2
    changed = memory.clone()
    changed[3:] += 100.0
    with torch.no_grad():
        before = layer(queries, memory, memory_mask=blocked)
        after = layer(queries, changed, memory_mask=blocked)
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1]), "query 1 is unmasked and must see the change"


def _one_hot_logits(labels, num_classes, confidence=10.0):
    logits = torch.full((len(labels), num_classes + 1), -confidence)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = confidence
    return logits


def test_panoptic_segments_do_not_overlap_and_stuff_merges():
    masks = torch.full((4, 6, 6), -10.0)
    masks[0, :, :3] = 10.0  # stuff class 3, left half
    masks[1, :, 3:] = 10.0  # stuff class 3 again, right half -> merged with query 0
    masks[2, 1:3, 1:3] = 15.0  # thing class 0, more confident than the stuff under it
    masks[3, 4:, 4:] = 10.0  # "no object"
    mask_cls = _one_hot_logits([3, 3, 0, 5], num_classes=5)
    panoptic, segments = panoptic_inference(mask_cls, masks, thing_ids={0, 1}, object_mask_threshold=0.8,
                                            overlap_threshold=0.0)
    assert [s["category_id"] for s in segments] == [3, 0]
    assert [s["isthing"] for s in segments] == [False, True]
    ids = set(panoptic.unique().tolist())
    assert ids == {s["id"] for s in segments}, "every pixel belongs to exactly one listed segment"
    assert (panoptic[1:3, 1:3] == segments[1]["id"]).all()


def test_panoptic_thresholds_are_honoured():
    masks = torch.full((2, 4, 4), -10.0)
    masks[0, :2] = 10.0
    masks[1, :, :] = 10.0  # covers everything but loses most pixels to query 0
    mask_cls = _one_hot_logits([1, 2], num_classes=3)
    mask_cls[1, 2] = 1.0  # query 1 has a low score
    _, segments = panoptic_inference(mask_cls, masks, {1}, object_mask_threshold=0.8, overlap_threshold=0.8)
    assert [s["category_id"] for s in segments] == [1], "low score query dropped"
    mask_cls[1, 2] = 10.0
    masks[0] = masks[0] + 1.0  # query 0 wins its half
    _, segments = panoptic_inference(mask_cls, masks, {1}, object_mask_threshold=0.8, overlap_threshold=0.8)
    assert [s["category_id"] for s in segments] == [1], "query 1 keeps only half of its mask < 0.8"
    _, segments = panoptic_inference(mask_cls, masks, {1}, object_mask_threshold=0.8, overlap_threshold=0.4)
    assert [s["category_id"] for s in segments] == [1, 2]


def test_semantic_inference_weights_masks_by_class_probability():
    masks = torch.full((2, 3, 3), -20.0)
    masks[0, 0] = 20.0
    sem = semantic_inference(_one_hot_logits([1, 0], num_classes=2, confidence=20.0), masks)
    assert sem.shape == (2, 3, 3)
    assert sem[1, 0].min() > 0.99 and sem[0].max() < 1e-6


def test_instance_inference_topk_scores_and_thing_filter():
    masks = torch.full((3, 5, 5), -10.0)
    masks[0, :2, :2] = 10.0
    masks[1, 3:, 3:] = 10.0
    result = instance_inference(_one_hot_logits([0, 2, 1], num_classes=3), masks, topk=4)
    assert len(result) == 4
    best = result.scores.argmax()
    assert result.pred_masks[best].sum() in (4, 4.0)
    assert result.scores.max() == pytest.approx(1.0, abs=1e-3)
    only_things = instance_inference(_one_hot_logits([0, 2, 1], num_classes=3), masks, topk=4, thing_ids={2})
    assert set(only_things.pred_classes.tolist()) == {2}
    assert only_things.pred_boxes.tensor[0].tolist() == [3.0, 3.0, 5.0, 5.0]


def test_mean_inside_is_the_masked_mean_of_each_map():
    from kmax_m2f.modeling.postprocess import mean_inside

    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 7, 9, generator=generator)
    masks = torch.rand(5, 7, 9, generator=generator) > 0.5
    masks[3] = False  # an empty mask scores 0
    expected = (probs.flatten(1) * masks.flatten(1)).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    torch.testing.assert_close(mean_inside(probs, masks), expected)
    assert mean_inside(probs[:0], masks[:0]).shape == (0,)


def test_resize_to_output_is_detectron2s_postprocess_and_a_view_at_the_image_size():
    padded = torch.randn(5, 40, 64)
    same = resize_to_output(padded, (37, 60), 37, 60)
    assert torch.equal(same, sem_seg_postprocess(padded, (37, 60), 37, 60))
    assert same.data_ptr() == padded.data_ptr()  # a crop view: no full-resolution copy
    assert torch.equal(resize_to_output(padded, (37, 60), 74, 120), sem_seg_postprocess(padded, (37, 60), 74, 120))


def test_pixel_decoder_levels_are_contiguous_maps():
    cfg = kmax_m2f.build_config("tests/configs/tiny_maskformer_panoptic.yaml")
    model = build_model(cfg).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model.backbone(images)
        _, _, multi_scale = model.sem_seg_head.pixel_decoder.forward_features(features)
    # The upsampling of a channels-last view is several times slower on the CPU.
    assert all(level.is_contiguous() for level in multi_scale)
