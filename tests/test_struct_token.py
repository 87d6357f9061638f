"""StructToken: the ViT backbone, the head's blocks against explicit formulas, the official
parameter names, the loss, and the model end to end through the public tools."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

import kmax_m2f
from kmax_m2f.config import ConfigError
from kmax_m2f.data import build_mapper
from kmax_m2f.modeling.backbone.vit import VisionTransformer, resize_pos_embed
from kmax_m2f.modeling.meta_arch.semantic import SlidingWindowSemanticSegmentor, sliding_windows
from kmax_m2f.systems.struct_token.head import ChannelAttention, StructTokenHead

from .conftest import REPO, run_tool

CONFIG = "tests/configs/tiny_struct_token.yaml"
NUM_CLASSES = 8


def tiny_vit(**overrides) -> VisionTransformer:
    kwargs = dict(img_size=(64, 64), embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs).eval()


def tiny_head(block_type: str = "CSE", **overrides) -> StructTokenHead:
    kwargs = dict(num_classes=5, in_feature="last_feat", block_type=block_type, num_layers=2, token_size=(4, 4),
                  drop_path_rate=0.0)
    kwargs.update(overrides)
    return StructTokenHead({"last_feat": ShapeSpec(channels=32, stride=16)}, **kwargs).eval()


# ---------------------------------------------------------------------------------------------
# ViT backbone
# ---------------------------------------------------------------------------------------------
def test_vit_output_is_the_patch_grid_of_any_input_size():
    vit = tiny_vit()
    for height, width in [(64, 64), (70, 50), (96, 128)]:
        out = vit(torch.randn(2, 3, height, width))
        assert out.shape == (2, 32, -(-height // 16), -(-width // 16))


def test_vit_state_dict_has_mmseg_names():
    vit = VisionTransformer(depth=12)  # ViT-B/16 at 512, StructToken's configs
    per_layer = [
        "ln1.weight", "ln1.bias",
        "attn.attn.in_proj_weight", "attn.attn.in_proj_bias", "attn.attn.out_proj.weight", "attn.attn.out_proj.bias",
        "ln2.weight", "ln2.bias",
        "ffn.layers.0.0.weight", "ffn.layers.0.0.bias", "ffn.layers.1.weight", "ffn.layers.1.bias",
    ]
    expected = {"cls_token", "pos_embed", "patch_embed.projection.weight", "patch_embed.projection.bias"}
    expected |= {f"layers.{i}.{name}" for i in range(12) for name in per_layer}
    state = vit.state_dict()
    assert set(state) == expected
    assert state["pos_embed"].shape == (1, 1 + 32 * 32, 768)
    assert state["layers.0.attn.attn.in_proj_weight"].shape == (3 * 768, 768)
    assert state["layers.0.ffn.layers.0.0.weight"].shape == (4 * 768, 768)
    assert "ln1.weight" in VisionTransformer(depth=1, final_norm=True).state_dict()


def test_pos_embed_resampling_keeps_the_class_token_and_constant_grids():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    assert resize_pos_embed(pos, (4, 4), (4, 4), "bicubic") is pos
    constant = torch.cat([pos[:, :1], torch.full((1, 16, 8), 0.5)], dim=1)
    resized = resize_pos_embed(constant, (3, 6), (4, 4), "bicubic")
    assert resized.shape == (1, 1 + 18, 8)
    assert torch.equal(resized[:, 0], pos[:, 0])
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 18, 8), 0.5))


def test_class_token_takes_part_in_attention():
    vit = tiny_vit()
    image = torch.randn(1, 3, 64, 64)
    before = vit(image)
    with torch.no_grad():
        vit.cls_token.add_(torch.randn_like(vit.cls_token))
    assert not torch.allclose(before, vit(image)), "the class token changes the patch features"


# ---------------------------------------------------------------------------------------------
# Head
# ---------------------------------------------------------------------------------------------
def test_channel_attention_is_attention_between_channel_maps():
    torch.manual_seed(0)
    layer = ChannelAttention(query_channels=5, kv_channels=7, attn_drop=0.0, proj_drop=0.0, drop_path=0.0).eval()
    query, key_value = torch.randn(2, 5, 3, 4), torch.randn(2, 7, 3, 4)
    q = layer.query_map(query).reshape(2, 5, 12)
    k = layer.key_map(key_value).reshape(2, 7, 12)
    v = layer.value_map(key_value).reshape(2, 7, 12)
    expected = torch.zeros(2, 5, 12)
    for b in range(2):
        for i in range(5):
            weights = torch.softmax(torch.stack([q[b, i] @ k[b, j] / 12**0.5 for j in range(7)]), dim=0)
            expected[b, i] = sum(weights[j] * v[b, j] for j in range(7))
    expected = query + layer.out_project(expected.reshape(2, 5, 3, 4))
    torch.testing.assert_close(layer(query, key_value), expected)


def _block_keys(prefix: str, kind: str) -> set[str]:
    projection = [f"{conv}.{p}" for conv in ("conv1", "norm1", "conv2", "norm2", "conv3", "norm3")
                  for p in ("weight", "bias")]
    ffn = [f"{conv}.{p}" for conv in ("pwconv1", "norm1", "dwconv", "norm2", "pwconv2", "norm3")
           for p in ("weight", "bias")]
    if kind == "projection":
        return {f"{prefix}.{name}" for name in projection}
    return {f"{prefix}.{name}" for name in ffn}


@pytest.mark.parametrize("block_type", ["CSE", "SSE", "PWE"])
def test_head_state_dict_has_the_official_names(block_type):
    """The official ``decode_head.*`` keys (RockeyCoss/StructToken, derived from its modules)."""
    head = tiny_head(block_type)
    expected = {"kernels", "dec_proj.weight", "dec_proj.bias"}
    expected |= {f"residual_block.{m}.{p}" for m in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias")}
    for i in range(2):
        if block_type == "PWE":
            expected |= _block_keys(f"layers.{i}.attn.query_map", "projection")
            expected |= _block_keys(f"layers.{i}.attn.out_project", "projection")
            expected |= {f"layers.{i}.attn.attn_pw_conv.weight", f"layers.{i}.attn.attn_pw_conv.bias"}
        else:
            for name in ("query_map", "key_map", "value_map", "out_project"):
                expected |= _block_keys(f"layers.{i}.cross_attn.{name}", "projection")
        expected |= _block_keys(f"layers.{i}.ffn1", "ffn")
        if block_type == "CSE" and i == 0:  # not in the last block
            expected |= _block_keys(f"layers.{i}.ffn2", "ffn")
    state = head.state_dict()
    assert set(state) == expected
    assert state["kernels"].shape == (1, 5, 4, 4)
    joint = 5 + 32 if block_type != "CSE" else 5
    assert state["layers.0.ffn1.dwconv.weight"].shape == (4 * joint, 4, 3, 3), "groups = the FFN's input width"


def test_official_vit_b_head_sizes():
    """ViT-B/16, 150 classes, 4 blocks: the official heads' parameter counts."""
    sizes = {}
    for block_type in ("CSE", "SSE", "PWE"):
        head = StructTokenHead({"last_feat": ShapeSpec(channels=768, stride=16)}, num_classes=150,
                               in_feature="last_feat", block_type=block_type)
        sizes[block_type] = round(sum(p.numel() for p in head.parameters()) / 1e6, 2)
    assert sizes == {"CSE": 26.45, "SSE": 55.98, "PWE": 45.74}


@pytest.mark.parametrize("block_type", ["CSE", "SSE", "PWE"])
def test_head_resizes_its_tokens_to_the_feature_map(block_type):
    head = tiny_head(block_type)
    for size in [(4, 4), (5, 3)]:
        logits = head.layers_forward({"last_feat": torch.randn(2, 32, *size)})
        assert logits.shape == (2, 5, *size)
    upsampled, losses = head({"last_feat": torch.randn(2, 32, 5, 3)})
    assert upsampled.shape == (2, 5, 80, 48) and losses == {}


def test_loss_is_cross_entropy_of_the_upsampled_logits_and_survives_unlabelled_batches():
    head = tiny_head().train()
    features = {"last_feat": torch.randn(2, 32, 4, 4)}
    targets = torch.randint(0, 5, (2, 64, 64))
    targets[:, :8] = 255
    torch.manual_seed(1)
    loss = head(features, targets)[1]["loss_sem_seg"]
    torch.manual_seed(1)
    logits = F.interpolate(head.layers_forward(features), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, ignore_index=255))

    unlabelled = head(features, torch.full((2, 64, 64), 255))[1]["loss_sem_seg"]
    assert unlabelled.item() == 0.0
    unlabelled.backward()
    assert head.kernels.grad is not None and torch.isfinite(head.kernels.grad).all()


def test_unknown_block_type_and_feature_are_named():
    with pytest.raises(ValueError, match="MODEL.STRUCT_TOKEN.BLOCK"):
        tiny_head("XYZ")
    with pytest.raises(ValueError, match="MODEL.STRUCT_TOKEN.IN_FEATURE"):
        tiny_head(in_feature="res5")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def test_loss_falls_on_a_fixed_batch(synthetic_prefix):
    cfg = kmax_m2f.build_config(str(REPO / CONFIG))
    cfg.defrost()
    cfg.DATASETS.TRAIN = (f"{synthetic_prefix}_sem_seg_train",)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    mapper = build_mapper(cfg, is_train=True)
    batch = [mapper(record) for record in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:4]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    with EventStorage():
        for _ in range(60):
            loss = model(batch)["loss_sem_seg"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::10]


# ---------------------------------------------------------------------------------------------
# Sliding-window inference
# ---------------------------------------------------------------------------------------------
def test_sliding_windows_are_mmsegs_grid():
    assert sliding_windows(64, 100, (64, 64), (32, 32)) == [(0, 64, 0, 64), (0, 64, 32, 96), (0, 64, 36, 100)]
    assert sliding_windows(40, 50, (64, 64), (32, 32)) == [(0, 40, 0, 50)]
    for height, width in [(97, 31), (512, 683), (300, 300)]:
        covered = torch.zeros(height, width, dtype=torch.int64)
        for y1, y2, x1, x2 in sliding_windows(height, width, (64, 48), (40, 48)):
            assert y2 - y1 == min(64, height) and x2 - x1 == min(48, width)
            covered[y1:y2, x1:x2] += 1
        assert covered.min() >= 1


def _sliding_model(crop: int, stride: int) -> SlidingWindowSemanticSegmentor:
    """The tiny model built for ``crop`` x ``crop`` inputs, sliding windows of that size."""
    size = f"[{crop}, {crop}]"
    cfg = kmax_m2f.build_config(str(REPO / CONFIG), ["TEST.SLIDING_WINDOW.ENABLED", "True",
                                                      "TEST.SLIDING_WINDOW.CROP_SIZE", size,
                                                      "TEST.SLIDING_WINDOW.STRIDE", f"[{stride}, {stride}]",
                                                      "MODEL.STRUCT_TOKEN.IMAGE_SIZE", size, "MODEL.VIT.IMG_SIZE", size])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_sliding_window_averages_the_crops_own_predictions():
    model = _sliding_model(crop=32, stride=16)
    image = torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)
    with torch.no_grad():
        slid = model([{"image": image, "height": 48, "width": 64}])[0]["sem_seg"]
        model.test_crop_size = None  # whole-image inference on each crop as its own image
        expected = torch.zeros(NUM_CLASSES, 48, 64)
        counts = torch.zeros(1, 48, 64)
        for y1, y2, x1, x2 in sliding_windows(48, 64, (32, 32), (16, 16)):
            crop = image[:, y1:y2, x1:x2]
            expected[:, y1:y2, x1:x2] += model([{"image": crop, "height": y2 - y1, "width": x2 - x1}])[0]["sem_seg"]
            counts[:, y1:y2, x1:x2] += 1
    assert len(sliding_windows(48, 64, (32, 32), (16, 16))) == 6
    # Crops run as one batch there and one by one here: float32 rounding only.
    torch.testing.assert_close(slid, expected / counts, atol=1e-4, rtol=1e-4)


def test_one_window_covering_the_image_is_whole_image_inference():
    model = _sliding_model(crop=64, stride=32)
    image = {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 128, "width": 128}
    with torch.no_grad():
        slid = model([image])[0]["sem_seg"]
        model.test_crop_size = None
        torch.testing.assert_close(slid, model([image])[0]["sem_seg"])
    assert slid.shape == (NUM_CLASSES, 128, 128)


def test_num_classes_disagreeing_with_the_dataset_is_named(synthetic_prefix):
    cfg = kmax_m2f.build_config(str(REPO / CONFIG), ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "150",
                                                      "DATASETS.TRAIN", f"('{synthetic_prefix}_sem_seg_train',)"])
    with pytest.raises(ValueError, match="Set MODEL.SEM_SEG_HEAD.NUM_CLASSES 8"):
        build_model(cfg)


def test_stride_beyond_the_crop_is_refused():
    with pytest.raises(ValueError, match="TEST.SLIDING_WINDOW.STRIDE"):
        _sliding_model(crop=32, stride=40)


def test_synthetic_quick_start_config_builds_and_segments():
    cfg = kmax_m2f.build_config(str(REPO / "configs/synthetic/semantic-segmentation/structtoken_vit_synthetic.yaml"))
    model = build_model(cfg).eval()
    assert model.sem_seg_head.kernels.shape == (1, NUM_CLASSES, 16, 16)
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 256, 256), dtype=torch.uint8)}])[0]["sem_seg"]
    assert out.shape == (NUM_CLASSES, 256, 256)


def _train_net(datasets_dir, output_dir, opts=(), flags=()):
    args = ["tools/train_net.py", "--config-file", CONFIG, *flags, "OUTPUT_DIR", str(output_dir), *opts]
    result = run_tool(args, datasets_dir, REPO)
    return result.stdout + result.stderr


@pytest.mark.parametrize("block_type", ["CSE", "PWE"])
def test_train_eval_resume_and_demo(datasets_dir, tmp_path, block_type):
    opts = ["MODEL.STRUCT_TOKEN.BLOCK", block_type]
    log = _train_net(datasets_dir, tmp_path / "train", opts)
    assert (tmp_path / "train" / "model_final.pth").is_file()
    assert "copypaste: Task: sem_seg" in log

    weights = str(tmp_path / "train" / "model_final.pth")
    # 64 x 64 windows (the training size) 32 apart over the test images resized to 96 x 96.
    sliding = ["TEST.SLIDING_WINDOW.ENABLED", "True", "TEST.SLIDING_WINDOW.CROP_SIZE", "[64, 64]",
               "TEST.SLIDING_WINDOW.STRIDE", "[32, 32]", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96"]
    log = _train_net(datasets_dir, tmp_path / "eval", opts + sliding + ["MODEL.WEIGHTS", weights], flags=["--eval-only"])
    assert "Starting training" not in log and "copypaste: Task: sem_seg" in log  # SemSegEvaluator

    (tmp_path / "train" / "last_checkpoint").write_text("model_0000002.pth")
    log = _train_net(datasets_dir, tmp_path / "train", opts, flags=["--resume"])
    assert "Starting training from iteration 3" in log

    image = datasets_dir / "synthetic" / "val" / "000001.jpg"
    run_tool(["tools/demo.py", "--config-file", CONFIG, "--input", str(image), "--output", str(tmp_path / "demo"),
              "--opts", "MODEL.WEIGHTS", weights, *opts], datasets_dir, REPO)
    assert Image.open(tmp_path / "demo" / "000001.png").size == Image.open(image).size


# ---------------------------------------------------------------------------------------------
# Official checkpoints (mmseg files)
# ---------------------------------------------------------------------------------------------
def _tiny_model():
    cfg = kmax_m2f.build_config(str(REPO / CONFIG))
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def test_official_checkpoint_converts_and_loads_to_the_same_model(datasets_dir, tmp_path):
    _, model = _tiny_model()
    official = {
        k.replace("sem_seg_head.", "decode_head.", 1): v for k, v in model.state_dict().items()
    }
    official["backbone.ln1.weight"] = torch.ones(32)  # mmseg's final norm, off in StructToken's configs
    torch.save({"state_dict": official, "meta": {"mmseg_version": "0.20.2"}}, tmp_path / "official.pth")
    run_tool(["tools/convert_structtoken.py", "--config-file", CONFIG, "--input", str(tmp_path / "official.pth"),
              "--output", str(tmp_path / "converted.pth")], datasets_dir, REPO)

    from detectron2.checkpoint import DetectionCheckpointer

    _, fresh = _tiny_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    DetectionCheckpointer(fresh).load(str(tmp_path / "converted.pth"))
    loaded, original = fresh.state_dict(), model.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original), "every tensor loaded"
    image = {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}
    with torch.no_grad():
        torch.testing.assert_close(fresh([image])[0]["sem_seg"], model([image])[0]["sem_seg"])


def test_bare_vit_checkpoint_gets_its_position_embedding_resampled():
    from kmax_m2f.systems.struct_token.checkpoint import convert_structtoken_checkpoint

    _, model = _tiny_model()
    backbone = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    backbone["pos_embed"] = torch.randn(1, 1 + 6 * 6, 32)  # pre-trained on another size
    backbone["head.weight"] = torch.randn(10, 32)  # an ImageNet classifier
    converted = convert_structtoken_checkpoint(backbone, pos_grid_size=(4, 4))
    assert set(converted) == {k for k in model.state_dict() if k.startswith("backbone.")}
    assert converted["backbone.pos_embed"].shape == (1, 17, 32)
    assert torch.equal(converted["backbone.pos_embed"][:, 0], backbone["pos_embed"][:, 0])


# timm / DeiT ViTs: built with timm itself, so the key names and the computation are timm's.
def _timm_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    torch.manual_seed(0)
    model = TimmVisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "pos_embed", "dist_token")) or "norm" in name:
                p.normal_()  # timm starts these at zeros / ones: make every tensor's place matter
    return model.eval()


def _converted_vit(state_dict, final_norm=True):
    from kmax_m2f.systems.struct_token.checkpoint import convert_structtoken_checkpoint

    converted = convert_structtoken_checkpoint(state_dict, pos_grid_size=(4, 4), final_norm=final_norm)
    ours = VisionTransformer(img_size=(64, 64), embed_dim=32, depth=2, num_heads=2, final_norm=final_norm).eval()
    ours.load_state_dict({k[len("backbone."):]: v for k, v in converted.items()}, strict=True)
    return ours


@pytest.mark.parametrize("variant", ["vit", "no_embed_class"])
def test_timm_vit_converts_to_the_same_features(variant):
    timm_model = _timm_vit(no_embed_class=variant == "no_embed_class")
    ours = _converted_vit(timm_model.state_dict())
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = timm_model.forward_features(image)[:, 1:]  # [B, 16, C] after the final norm
        features = ours(image)  # [B, C, 4, 4]
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), expected, rtol=1e-5, atol=1e-5)


def test_distilled_deit_file_converts_through_the_tool(datasets_dir, tmp_path):
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    deit = VisionTransformerDistilled(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        deit.pos_embed.normal_()
    torch.save({"model": deit.state_dict(), "epoch": 300}, tmp_path / "deit.pth")  # DeiT's release layout
    run_tool(["tools/convert_structtoken.py", "--config-file", CONFIG, "--input", str(tmp_path / "deit.pth"),
              "--output", str(tmp_path / "converted.pth")], datasets_dir, REPO)
    converted = torch.load(tmp_path / "converted.pth", weights_only=True)["model"]
    _, model = _tiny_model()
    backbone_keys = {k for k in model.state_dict() if k.startswith("backbone.")}
    assert set(converted) == backbone_keys  # final norm dropped (FINAL_NORM False), heads and dist token skipped
    expected_pos = torch.cat([deit.pos_embed[:, :1], deit.pos_embed[:, 2:]], dim=1)  # without the distillation entry
    assert torch.equal(converted["backbone.pos_embed"], expected_pos.detach())
    assert torch.equal(converted["backbone.layers.1.attn.attn.in_proj_weight"], deit.blocks[1].attn.qkv.weight.detach())


def test_timm_vit_with_register_tokens_is_refused():
    with pytest.raises(ValueError, match="register tokens"):
        _converted_vit(_timm_vit(reg_tokens=4).state_dict())


def test_checkpoint_of_another_model_is_refused_with_the_shapes(datasets_dir, tmp_path):
    _, model = _tiny_model()
    official = {k.replace("sem_seg_head.", "decode_head.", 1): v for k, v in model.state_dict().items()}
    official["decode_head.kernels"] = torch.zeros(1, 150, 4, 4)  # ADE20K's 150 classes
    torch.save({"state_dict": official}, tmp_path / "ade20k.pth")
    result = run_tool(["tools/convert_structtoken.py", "--config-file", CONFIG, "--input", str(tmp_path / "ade20k.pth"),
                       "--output", str(tmp_path / "out.pth")], datasets_dir, REPO, check=False)
    assert result.returncode != 0
    assert "sem_seg_head.kernels: (1, 150, 4, 4) in the file, (1, 8, 4, 4) in the model" in result.stderr
    assert not (tmp_path / "out.pth").exists()


def test_disagreeing_training_sizes_are_refused():
    """The token grid, the ViT grid, the crop and the sliding window: one size, or a message."""
    cfg = kmax_m2f.build_config(str(REPO / CONFIG), ["TEST.SLIDING_WINDOW.ENABLED", "True",
                                                     "TEST.SLIDING_WINDOW.CROP_SIZE", "[48, 48]"])
    with pytest.raises(ConfigError, match=r"MODEL\.STRUCT_TOKEN\.IMAGE_SIZE \[64, 64\].*"
                                          r"TEST\.SLIDING_WINDOW\.CROP_SIZE \[48, 48\]: set them all alike"):
        build_model(cfg)


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_benchmark_measures_a_structtoken_step(datasets_dir, mode):
    """tools/benchmark.py structtoken's measuring child runs a training step / a sliding-window
    inference (64x128: two windows) of a StructToken config and reports its time."""
    import json

    result = run_tool(["tools/benchmark.py", "structtoken", "--repeats", "1", "--warmup", "0", "--measure", CONFIG,
                       mode, "64", "128", "2", "time"], datasets_dir, REPO)
    assert json.loads(result.stdout.strip().splitlines()[-1])["time_ms"] > 0
