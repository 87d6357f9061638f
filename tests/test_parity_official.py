"""This project's Mask2Former and kMaX-DeepLab equal the official implementations, in float64.

The fixtures under tests/fixtures/parity/ were written by the official code (facebookresearch/
Mask2Former, bytedance/kmax-deeplab; see the README there): a small model's state dict, its
inputs, and the official per-layer predictions, final semantic / panoptic / instance results,
weighted losses and Hungarian matchings. Here the same state dict is loaded into this package's
model with strict=True and every one of those is compared.
"""
import os
from contextlib import contextmanager

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

import kmax_m2f
from kmax_m2f.systems.kmax_deeplab.transformer_decoder import resize_aux_outputs

from .conftest import default_dtype
from .fixtures.parity.weights import expand_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
TOLERANCE = 1e-10
VOID = 255  # this project's semantic void label (the official kMaX mapper writes -1)


def _register_metadata(num_classes: int, thing_ids: tuple[int, ...]) -> None:
    metadata = MetadataCatalog.get("parity_train")
    if metadata.get("stuff_classes") is not None:
        return
    metadata.set(
        stuff_classes=[f"class{i}" for i in range(num_classes)],
        thing_classes=[f"class{i}" for i in thing_ids],
        thing_dataset_id_to_contiguous_id={i + 1: i for i in thing_ids},
        stuff_dataset_id_to_contiguous_id={i + 1: i for i in range(num_classes)},
        ignore_label=VOID,
    )


@contextmanager
def _float64():
    """float64 as the default dtype, and ``Tensor.float()`` (both implementations' casts for fp16
    autocast) casting to it, as when the fixtures were made."""
    previous_float = torch.Tensor.float
    torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.get_default_dtype(), *args, **kwargs)
    try:
        with default_dtype(torch.float64):
            yield
    finally:
        torch.Tensor.float = previous_float


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert difference <= TOLERANCE, f"{what}: max |difference| {difference:.3g} > {TOLERANCE}"


def _instances(plain: dict) -> Instances:
    instances = Instances(tuple(plain["image_size"]))
    instances.gt_classes = plain["gt_classes"]
    instances.gt_masks = plain["gt_masks"]
    return instances


def _training_inputs(fixture: dict) -> list[dict]:
    inputs = []
    for item in fixture["training_inputs"]:
        item = dict(item, instances=_instances(item["instances"]))
        if "sem_seg_gt" in item:
            item["sem_seg_gt"] = item["sem_seg_gt"].masked_fill(item["sem_seg_gt"] < 0, VOID)
        inputs.append(item)
    return inputs


@pytest.fixture(scope="module", params=["mask2former_tiny", "mask2former_swin_semantic", "kmax_tiny"])
def parity(request, tmp_path_factory):
    """(fixture dict, our float64 model with the official weights loaded strictly)."""
    fixture = torch.load(os.path.join(FIXTURES, f"{request.param}.pth"), weights_only=True)
    config_file = tmp_path_factory.mktemp("parity") / "config.yaml"
    config_file.write_text(fixture["config"])
    cfg = kmax_m2f.build_config(str(config_file), ["MODEL.DEVICE", "cpu"])
    _register_metadata(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, (0, 1, 2))
    model = build_model(cfg)
    incompatible = model.load_state_dict(expand_state_dict(fixture["state_dict"]), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return fixture, model.double()


def _run_head(model, inputs: list[dict]) -> tuple[dict, list[dict]]:
    """The model's results on ``inputs`` and its head's per-layer (auxiliary, then final) class
    and mask logits."""
    captured = {}

    def hook(module, args, outputs):
        aux_outputs = outputs["aux_outputs"]
        if any(aux["pred_masks"].shape != outputs["pred_masks"].shape for aux in aux_outputs):
            # kMaX's head keeps each layer's masks at its stride (the official one upsamples
            # them in the head; here the meta-architecture does it for the losses).
            aux_outputs = resize_aux_outputs(outputs, outputs["pred_masks"].shape[-2:])
        layers = list(aux_outputs) + [outputs]
        captured["pred_logits"] = [layer["pred_logits"] for layer in layers]
        captured["pred_masks"] = [layer["pred_masks"] for layer in layers]

    handle = model.sem_seg_head.register_forward_hook(hook)
    try:
        results = model(inputs)
    finally:
        handle.remove()
    return captured, results


def test_inference_equals_the_official_outputs(parity):
    fixture, model = parity
    expected = fixture["inference"]
    model.eval()
    with _float64(), torch.no_grad():
        layers, results = _run_head(model, fixture["inference_inputs"])
    for key in ("pred_logits", "pred_masks"):
        assert len(layers[key]) == len(expected["layers"][key]), f"number of {key} layers"
        for index, (actual, official) in enumerate(zip(layers[key], expected["layers"][key])):
            _close(actual, official, f"layer {index} {key}")

    result = results[0]
    assert sorted(result) == sorted(k for k in ("sem_seg", "panoptic_seg", "instances") if k in expected)
    _close(result["sem_seg"], expected["sem_seg"], "sem_seg")
    if "panoptic_seg" in expected:
        _check_panoptic(result["panoptic_seg"], expected)
    if "instances" in expected:
        _check_instances(result["instances"], expected["instances"])


def _check_panoptic(panoptic: tuple, expected: dict) -> None:
    panoptic_seg, segments_info = panoptic
    assert torch.equal(panoptic_seg.int(), expected["panoptic_seg"].int()), "panoptic_seg ids"
    assert len(expected["segments_info"]) >= 2, "the fixture should exercise several segments"
    keys = ("id", "isthing", "category_id")
    assert [{k: s[k] for k in keys} for s in segments_info] == [{k: s[k] for k in keys} for s in expected["segments_info"]]


def _check_instances(instances, official: dict) -> None:
    # Both keep the top-k (query, class) pairs; the official topk is unsorted, so compare in a
    # canonical order.
    ours_order = torch.argsort(instances.scores, descending=True, stable=True)
    official_order = torch.argsort(official["scores"], descending=True, stable=True)
    _close(instances.scores[ours_order], official["scores"][official_order], "instance scores")
    assert torch.equal(instances.pred_classes[ours_order], official["pred_classes"][official_order]), "instance classes"
    assert torch.equal(instances.pred_masks[ours_order].bool(), official["pred_masks"][official_order]), "instance masks"


def test_training_losses_and_matching_equal_the_official_ones(parity):
    fixture, model = parity
    expected = fixture["training"]
    matchings = []
    matcher = model.criterion.matcher
    matcher_forward = matcher.forward

    def recording_forward(*args, **kwargs):
        indices = matcher_forward(*args, **kwargs)
        matchings.append(indices)
        return indices

    matcher.forward = recording_forward
    model.train()
    try:
        with _float64():
            torch.manual_seed(expected["seed"])
            losses = model(_training_inputs(fixture))
    finally:
        del matcher.forward

    assert len(matchings) == len(expected["matching"]), "number of matchings"
    for call, (ours, official) in enumerate(zip(matchings, expected["matching"])):
        for image, ((src, tgt), (official_src, official_tgt)) in enumerate(zip(ours, official)):
            assert torch.equal(src, official_src) and torch.equal(tgt, official_tgt), f"matching {call}, image {image}"
    assert sorted(losses) == sorted(expected["losses"])
    for name, value in expected["losses"].items():
        _close(losses[name], value, name)
