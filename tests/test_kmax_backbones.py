"""kMaX-DeepLab's backbones and config: ConvNeXt (D2ConvNeXt) key names of the official port for
ConvNeXt-T / L, numerics against torchvision's independent ConvNeXt, output sizes on odd inputs,
gradients, stochastic depth; the ResNet with TF-style BatchNorm (custom_bn_build_resnet_backbone);
the MODEL.KMAX_DEEPLAB / MODEL.CONVNEXT keys and the official port's R50 YAML."""

from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone
from torch import nn
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.convnext import ConvNeXt as TorchvisionConvNeXt

import kmax_m2f
from kmax_m2f.config import ConfigError, build_config, fixed_image_size
from kmax_m2f.engine.optimizer import build_param_groups
from kmax_m2f.layers import LayerNorm2d
from kmax_m2f.modeling.backbone.convnext import D2ConvNeXt
from kmax_m2f.modeling.backbone.resnet_norm import custom_bn_build_resnet_backbone

from .conftest import backbone_cfg

CONVNEXT_T = dict(DEPTHS=[3, 3, 9, 3], DIMS=[96, 192, 384, 768])
CONVNEXT_L = dict(DEPTHS=[3, 3, 27, 3], DIMS=[192, 384, 768, 1536])
TINY = dict(DEPTHS=[1, 1, 2, 1], DIMS=[8, 16, 32, 64])


def convnext_cfg(**convnext_keys):
    return backbone_cfg("D2ConvNeXt", "CONVNEXT", **convnext_keys)


def build_convnext(**convnext_keys) -> D2ConvNeXt:
    torch.manual_seed(0)
    return build_backbone(convnext_cfg(**convnext_keys))


def test_registered_under_the_official_names():
    assert BACKBONE_REGISTRY.get("D2ConvNeXt") is D2ConvNeXt
    assert (
        BACKBONE_REGISTRY.get("custom_bn_build_resnet_backbone") is custom_bn_build_resnet_backbone
    )


# --------------------------------------------------------------------------- ConvNeXt names


def official_convnext_keys(depths: list[int], layer_scale: bool = True) -> Iterator[str]:
    """State-dict keys of the official kmax-deeplab D2ConvNeXt: the stem (conv, LayerNorm), three
    downsampling layers (LayerNorm, conv), the blocks; no per-output norms, no head."""
    for layer in range(4):
        for index in (0, 1):
            yield from (
                f"downsample_layers.{layer}.{index}.weight",
                f"downsample_layers.{layer}.{index}.bias",
            )
    block_keys = [
        f"{module}.{p}"
        for module in ("dwconv", "norm", "pwconv1", "pwconv2")
        for p in ("weight", "bias")
    ]
    if layer_scale:
        block_keys.append("gamma")
    for stage, depth in enumerate(depths):
        for block in range(depth):
            yield from (f"stages.{stage}.{block}.{key}" for key in block_keys)


SPOT_CHECKS = {
    "convnext_t": {
        "downsample_layers.0.0.weight": (96, 3, 4, 4),
        "downsample_layers.0.1.weight": (96,),
        "downsample_layers.1.0.bias": (96,),
        "downsample_layers.1.1.weight": (192, 96, 2, 2),
        "stages.2.8.dwconv.weight": (384, 1, 7, 7),
        "stages.2.8.pwconv1.weight": (1536, 384),
        "stages.3.2.pwconv2.weight": (768, 3072),
        "stages.3.2.gamma": (768,),
    },
    "convnext_l": {
        "downsample_layers.0.0.weight": (192, 3, 4, 4),
        "downsample_layers.3.0.weight": (768,),
        "downsample_layers.3.1.weight": (1536, 768, 2, 2),
        "stages.0.0.dwconv.bias": (192,),
        "stages.2.26.norm.weight": (768,),
        "stages.2.26.pwconv1.weight": (3072, 768),
        "stages.3.2.gamma": (1536,),
    },
}


def torchvision_convnext(depths: list[int], dims: list[int]) -> TorchvisionConvNeXt:
    settings = [CNBlockConfig(dims[i], dims[i + 1] if i < 3 else None, depths[i]) for i in range(4)]
    return TorchvisionConvNeXt(settings)


@pytest.mark.parametrize("variant, keys", [("convnext_t", CONVNEXT_T), ("convnext_l", CONVNEXT_L)])
def test_state_dict_matches_the_official_names(variant: str, keys: dict):
    with torch.device("meta"):
        model = build_backbone(convnext_cfg(**keys))
        reference = torchvision_convnext(keys["DEPTHS"], keys["DIMS"])
    state = model.state_dict()
    assert set(state) == set(official_convnext_keys(keys["DEPTHS"]))
    for name, shape in SPOT_CHECKS[variant].items():
        assert tuple(state[name].shape) == shape, name
    # Same parameter count as torchvision's ConvNeXt without its classifier (norm + linear).
    expected = sum(
        p.numel() for n, p in reference.named_parameters() if not n.startswith("classifier")
    )
    assert sum(p.numel() for p in model.parameters()) == expected


def test_no_layer_scale_means_no_gamma():
    with torch.device("meta"):
        model = build_backbone(convnext_cfg(**TINY, LSIT=0.0))
    assert set(model.state_dict()) == set(official_convnext_keys(TINY["DEPTHS"], layer_scale=False))


# --------------------------------------------------------------------------- ConvNeXt outputs


@pytest.mark.parametrize("height, width", [(70, 101), (65, 65)])
def test_output_shapes_strides_channels(height: int, width: int):
    model = build_convnext(**TINY, OUT_FEATURES=["stem", "res2", "res3", "res4", "res5"]).eval()
    assert isinstance(model, Backbone)
    shapes = model.output_shape()
    assert {name: (s.channels, s.stride) for name, s in shapes.items()} == {
        "stem": (8, 4),
        "res2": (8, 4),
        "res3": (16, 8),
        "res4": (32, 16),
        "res5": (64, 32),
    }
    with torch.no_grad():
        features = model(torch.randn(2, 3, height, width))
    assert list(features) == ["stem", "res2", "res3", "res4", "res5"]
    for name, feature in features.items():
        stride = shapes[name].stride
        # The padding before each downsampling gives ceil sizes (1281 -> 321, 161, 81, 41).
        assert tuple(feature.shape) == (
            2,
            shapes[name].channels,
            -(-height // stride),
            -(-width // stride),
        ), name
        assert torch.isfinite(feature).all()


def test_out_features_must_be_allowed_by_out_indices():
    model = build_convnext(**TINY, OUT_INDICES=[1, 3], OUT_FEATURES=["res3", "res5"])
    assert set(model.output_shape()) == {"res3", "res5"}
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_convnext(**TINY, OUT_INDICES=[1, 3], OUT_FEATURES=["res2"])
    with pytest.raises(ValueError, match="OUT_INDICES"):
        build_convnext(**TINY, OUT_INDICES=[4])
    with pytest.raises(ValueError, match="4 stages"):
        build_convnext(DEPTHS=[1, 1, 1], DIMS=[8, 16, 32])


def torchvision_to_ours(name: str) -> str:
    """torchvision ConvNeXt parameter name -> official kmax-deeplab name."""
    parts = name.split(".")
    index = int(parts[1])
    if index == 0:  # stem: conv, LayerNorm2d
        return "downsample_layers.0." + ".".join(parts[2:])
    if index % 2 == 0:  # downsampling before stage index / 2: LayerNorm2d, conv
        return f"downsample_layers.{index // 2}." + ".".join(parts[2:])
    stage, block = (index - 1) // 2, parts[2]
    if parts[3] == "layer_scale":
        return f"stages.{stage}.{block}.gamma"
    module = {"0": "dwconv", "2": "norm", "3": "pwconv1", "5": "pwconv2"}[parts[4]]
    return f"stages.{stage}.{block}.{module}.{parts[5]}"


def test_matches_torchvision_convnext():
    """Same weights, same features as torchvision's ConvNeXt (an independent implementation) run
    with the padding of the official model made explicit: (1, 2) around the stem, 1 after each
    later downsampling, before its LayerNorm. Random norms and layer scales, so that the padded
    pixels (which become the LayerNorm bias) and gamma matter."""
    torch.manual_seed(1)
    reference = torchvision_convnext(TINY["DEPTHS"], TINY["DIMS"]).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.dim() == 1 or "layer_scale" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    model = build_convnext(**TINY, DROP_PATH_RATE=0.0).eval()
    ours = model.state_dict()
    for name, value in reference.state_dict().items():
        if name.startswith("classifier"):
            continue
        target = torchvision_to_ours(name)
        ours[target] = value.reshape(ours[target].shape)  # layer_scale is [C, 1, 1], gamma [C]
    model.load_state_dict(ours)

    image = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        features = model(image)
        x = reference.features[1](reference.features[0](F.pad(image, (1, 2, 1, 2))))
        torch.testing.assert_close(features["res2"], x, atol=1e-4, rtol=1e-4)
        for stage in range(1, 4):
            x = reference.features[2 * stage](F.pad(x, (0, 1, 0, 1)))
            x = reference.features[2 * stage + 1](x)
            torch.testing.assert_close(features[f"res{stage + 2}"], x, atol=1e-4, rtol=1e-4)


def test_layer_norm_2d():
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6).permute(
        0, 3, 1, 2
    )
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    assert norm(x.bfloat16()).dtype == torch.float32  # statistics in float32, as the official one
    assert norm.double()(x.double()).dtype == torch.float64
    # An nn.LayerNorm, so the optimizer groups put its parameters in the no-decay norm group.
    model = build_convnext(**TINY)
    groups = build_param_groups(
        model,
        1.0,
        weight_decay=0.05,
        weight_decay_norm=0.0,
        weight_decay_embed=0.0,
        backbone_multiplier=1.0,
    )
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(model.downsample_layers[0][1].weight)] == 0.0
    assert decay_of[id(model.downsample_layers[2][0].bias)] == 0.0
    assert decay_of[id(model.stages[0][0].pwconv1.weight)] == 0.05


def test_backward_reaches_every_parameter():
    model = build_convnext(**TINY, DROP_PATH_RATE=0.0).train()
    features = model(torch.randn(2, 3, 45, 61))
    sum(f.square().mean() for f in features.values()).backward()
    for name, param in model.named_parameters():
        assert (
            param.grad is not None
            and torch.isfinite(param.grad).all()
            and param.grad.abs().sum() > 0
        ), name


def test_drop_path_schedule_and_eval_identity():
    dropping = build_convnext(**TINY, DROP_PATH_RATE=0.5)
    rates = [block.drop_path.p for stage in dropping.stages for block in stage]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.5, 5))
    plain = build_convnext(**TINY, DROP_PATH_RATE=0.0)
    plain.load_state_dict(dropping.state_dict())
    # Layer scale 1 instead of 1e-6, so that dropping a branch changes the output visibly.
    with torch.no_grad():
        for model in (dropping, plain):
            for stage in model.stages:
                for block in stage:
                    block.gamma.fill_(1.0)
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


# --------------------------------------------------------------------------- ResNet


def resnet_cfg(**resnets_keys):
    cfg = kmax_m2f.build_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "custom_bn_build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    for key, value in resnets_keys.items():
        setattr(cfg.MODEL.RESNETS, key, value)
    return cfg


def official_r50_keys() -> Iterator[str]:
    """kmax-deeplab's R50 state dict (its copy of detectron2's ResNet, SyncBatchNorm norms)."""
    norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    yield "stem.conv1.weight"
    yield from (f"stem.conv1.norm.{k}" for k in norm)
    for stage, num_blocks in enumerate((3, 4, 6, 3), start=2):
        for block in range(num_blocks):
            for conv in ["conv1", "conv2", "conv3"] + (["shortcut"] if block == 0 else []):
                yield f"res{stage}.{block}.{conv}.weight"
                yield from (f"res{stage}.{block}.{conv}.norm.{k}" for k in norm)


def test_r50_has_the_official_names_and_tf_batch_norm():
    with torch.device("meta"):
        model = build_backbone(resnet_cfg(NORM="SyncBN"))
    assert set(model.state_dict()) == set(official_r50_keys())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 53 and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert all((m.eps, m.momentum) == (1e-3, 0.01) for m in norms)
    assert {name: (s.channels, s.stride) for name, s in model.output_shape().items()} == {
        "res2": (256, 4),
        "res3": (512, 8),
        "res4": (1024, 16),
        "res5": (2048, 32),
    }


def test_sync_bn_trains_in_a_single_process_with_the_configured_momentum():
    """No process group: SyncBatchNorm normalises with the batch statistics like BatchNorm, and
    the running mean moves by momentum 0.01 (PyTorch's default would move it by 0.1)."""
    model = build_backbone(resnet_cfg(NORM="SyncBN", DEPTH=18, RES2_OUT_CHANNELS=64)).train()
    image = torch.randn(2, 3, 32, 32)
    features = model(image)
    sum(f.mean() for f in features.values()).backward()
    stem = model.stem.conv1
    batch_mean = F.conv2d(image, stem.weight, stride=2, padding=3).mean(dim=(0, 2, 3))
    torch.testing.assert_close(
        stem.norm.running_mean, 0.01 * batch_mean.detach(), atol=1e-6, rtol=1e-4
    )


def test_norm_keys_apply_to_bn_and_frozen_bn():
    cfg = resnet_cfg(NORM="BN", DEPTH=18, RES2_OUT_CHANNELS=64, NORM_EPS=1e-4, NORM_MOMENTUM=0.2)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # stem and res2 become FrozenBatchNorm2d
    model = build_backbone(cfg)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    trained = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen and trained
    assert all(m.eps == 1e-4 for m in frozen)
    assert all((m.eps, m.momentum) == (1e-4, 0.2) for m in trained)
    with pytest.raises(ValueError, match="no BatchNorm"):
        build_backbone(resnet_cfg(NORM="GN", DEPTH=18, RES2_OUT_CHANNELS=64))


# --------------------------------------------------------------------------- config

# The official port's configs/coco/panoptic_segmentation/kmax_r50.yaml (bytedance/kmax-deeplab).
OFFICIAL_COCO_R50 = """
MODEL:
  BACKBONE: {FREEZE_AT: 0, NAME: "custom_bn_build_resnet_backbone"}
  WEIGHTS: "../R-50.pkl"
  PIXEL_MEAN: [127.5, 127.5, 127.5]
  PIXEL_STD: [127.5, 127.5, 127.5]
  RESNETS:
    DEPTH: 50
    STEM_TYPE: "basic"
    STEM_OUT_CHANNELS: 64
    STRIDE_IN_1X1: False
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    NORM: "SyncBN"
    RES5_MULTI_GRID: [1, 1, 1]
  META_ARCHITECTURE: "kMaXDeepLab"
  SEM_SEG_HEAD: {NAME: "kMaXDeepLabHead", IGNORE_VALUE: 255, NUM_CLASSES: 133, LOSS_WEIGHT: 1.0}
  KMAX_DEEPLAB:
    SAVE_VIS_NUM: 0
    SHARE_FINAL_MATCHING: True
    DEEP_SUPERVISION: True
    NO_OBJECT_WEIGHT: 1e-5
    CLASS_WEIGHT: 3.0
    DICE_WEIGHT: 3.0
    MASK_WEIGHT: 0.3
    INSDIS_WEIGHT: 1.0
    AUX_SEMANTIC_WEIGHT: 1.0
    PIXEL_DEC:
      NAME: "kMaXPixelDecoder"
      IN_FEATURES: ["res2", "res3", "res4", "res5"]
      DEC_LAYERS: [1, 5, 1, 1]
      LAYER_TYPES: ["axial", "axial", "bottleneck", "bottleneck"]
      DEC_CHANNELS: [512, 256, 128, 64]
    TRANS_DEC:
      NAME: "kMaXTransformerDecoder"
      DEC_LAYERS: [2, 2, 2]
      NUM_OBJECT_QUERIES: 128
      IN_CHANNELS: [2048, 1024, 512, 256]
      DROP_PATH_PROB: 0.2
    TEST:
      SEMANTIC_ON: False
      INSTANCE_ON: False
      PANOPTIC_ON: True
      PIXEL_CONFIDENCE_THRESHOLD: 0.4
      CLASS_THRESHOLD_THING: 0.7
      CLASS_THRESHOLD_STUFF: 0.5
      REORDER_CLASS_WEIGHT: 1.0
      REORDER_MASK_WEIGHT: 1.0
      OVERLAP_THRESHOLD: 0.8
DATASETS:
  TRAIN: ("coco_2017_train_panoptic",)
  TEST: ("coco_2017_val_panoptic_with_sem_seg",)
SOLVER:
  IMS_PER_BATCH: 64
  BASE_LR: 0.0005
  LR_SCHEDULER_NAME: "TF2WarmupPolyLR"
  MAX_ITER: 150000
  WARMUP_ITERS: 5000
  WEIGHT_DECAY: 0.05
  OPTIMIZER: "ADAMW"
  BACKBONE_MULTIPLIER: 0.1
  CLIP_GRADIENTS: {ENABLED: False}
  AMP: {ENABLED: True}
INPUT:
  IMAGE_SIZE: [1281, 1281]
  MIN_SCALE: 0.2
  MAX_SCALE: 2.0
  FORMAT: "RGB"
  DATASET_MAPPER_NAME: "coco_panoptic_lsj"
  MIN_SIZE_TEST: 1281
  MAX_SIZE_TEST: 1281
TEST: {EVAL_PERIOD: 5000}
DATALOADER: {FILTER_EMPTY_ANNOTATIONS: True, NUM_WORKERS: 4}
VERSION: 2
"""


def test_kmax_defaults_are_the_published_values():
    cfg = kmax_m2f.build_config()
    kmax = cfg.MODEL.KMAX_DEEPLAB
    weights = (
        kmax.CLASS_WEIGHT,
        kmax.DICE_WEIGHT,
        kmax.MASK_WEIGHT,
        kmax.INSDIS_WEIGHT,
        kmax.AUX_SEMANTIC_WEIGHT,
    )
    assert weights == (3.0, 3.0, 0.3, 1.0, 1.0)
    assert kmax.NO_OBJECT_WEIGHT == 1e-5 and kmax.SHARE_FINAL_MATCHING and kmax.DEEP_SUPERVISION
    assert (kmax.PIXEL_INSDIS_TEMPERATURE, kmax.PIXEL_INSDIS_SAMPLE_K) == (1.5, 4096)
    assert (kmax.AUX_SEMANTIC_TEMPERATURE, kmax.AUX_SEMANTIC_SAMPLE_K) == (2.0, 4096)
    assert kmax.PIXEL_DEC.NAME == "kMaXPixelDecoder"
    assert list(kmax.PIXEL_DEC.DEC_LAYERS) == [1, 5, 1, 1]
    assert list(kmax.PIXEL_DEC.LAYER_TYPES) == ["axial", "axial", "bottleneck", "bottleneck"]
    assert list(kmax.PIXEL_DEC.DEC_CHANNELS) == [512, 256, 128, 64]
    assert kmax.TRANS_DEC.NAME == "kMaXTransformerDecoder"
    assert list(kmax.TRANS_DEC.DEC_LAYERS) == [2, 2, 2] and kmax.TRANS_DEC.NUM_OBJECT_QUERIES == 128
    assert list(kmax.TRANS_DEC.IN_CHANNELS) == [2048, 1024, 512, 256]
    assert kmax.TRANS_DEC.DROP_PATH_PROB == 0.2
    t = kmax.TEST
    assert (t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON) == (False, False, True)
    assert (t.PIXEL_CONFIDENCE_THRESHOLD, t.CLASS_THRESHOLD_THING, t.CLASS_THRESHOLD_STUFF) == (
        0.4,
        0.7,
        0.5,
    )
    assert t.OVERLAP_THRESHOLD == 0.8 and kmax.SIZE_DIVISIBILITY == -1
    assert (cfg.MODEL.RESNETS.NORM_EPS, cfg.MODEL.RESNETS.NORM_MOMENTUM) == (1e-3, 0.01)
    convnext = cfg.MODEL.CONVNEXT
    assert (list(convnext.DEPTHS), list(convnext.DIMS)) == (
        CONVNEXT_L["DEPTHS"],
        CONVNEXT_L["DIMS"],
    )
    assert (convnext.DROP_PATH_RATE, convnext.LSIT, convnext.IN_CHANNELS) == (0.6, 1e-6, 3)
    # Mask2Former's keys keep their values.
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 100


@pytest.mark.parametrize("value, expected", [(1024, (1024, 1024)), ([1281, 1281], (1281, 1281)), ([1025, 2049], (1025, 2049))])
def test_official_image_size_is_a_list(tmp_path, value, expected):
    """Mask2Former's YAMLs give INPUT.IMAGE_SIZE as an int, kMaX's as [H, W]: both load."""
    config_file = tmp_path / "size.yaml"
    config_file.write_text(f"INPUT:\n  IMAGE_SIZE: {value}\n")
    assert fixed_image_size(build_config(str(config_file))) == expected
    assert fixed_image_size(build_config(opts=["INPUT.IMAGE_SIZE", str(value)])) == expected


def test_unset_or_bad_image_size_is_a_clear_error():
    with pytest.raises(ConfigError, match="INPUT.IMAGE_SIZE is not set"):
        fixed_image_size(build_config())
    with pytest.raises(ConfigError, match="positive int or \\[H, W\\]"):
        fixed_image_size(build_config(opts=["INPUT.IMAGE_SIZE", "[1, 2, 3]"]))


def test_official_r50_yaml_merges(tmp_path: Path):
    path = tmp_path / "kmax_r50.yaml"
    path.write_text(OFFICIAL_COCO_R50)
    cfg = kmax_m2f.build_config(str(path))
    assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY
    assert cfg.MODEL.KMAX_DEEPLAB.TRANS_DEC.DROP_PATH_PROB == 0.2
    assert cfg.INPUT.MIN_SCALE == 0.2 and cfg.SOLVER.BASE_LR == 5e-4
    assert fixed_image_size(cfg) == (1281, 1281)
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train_panoptic",)
