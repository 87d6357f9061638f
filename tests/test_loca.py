"""LOCA: views and correspondences, losses, teacher, model, pre-training, export, resume."""
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from PIL import Image

import kmax_m2f
from kmax_m2f.data.datasets.image_folder import list_images
from kmax_m2f.data.images import UnreadableImageError
from kmax_m2f.data.mappers import build_mapper
from kmax_m2f.engine import Trainer
from kmax_m2f.engine.optimizer import build_param_groups
from kmax_m2f.evaluation import LocalizationEvaluator, build_evaluator
from kmax_m2f.systems.loca import LocaViewMapper, export_backbone, teacher_momentum
from kmax_m2f.systems.loca.losses import cluster_prediction_losses, global_mean, localization_loss, sinkhorn
from kmax_m2f.systems.loca.views import (
    ColorAugmentation,
    CropBox,
    augment_colors,
    query_positions,
    reference_index_map,
    sample_crop_box,
)

from .conftest import REPO, run_tool

CONFIG = "tests/configs/tiny_loca.yaml"
STRUCT_TOKEN_CONFIG = "tests/configs/tiny_struct_token.yaml"
NO_COLORS = ColorAugmentation(jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0)


def tiny_cfg(*opts):
    return kmax_m2f.build_config(str(REPO / CONFIG), list(opts))


# --- views and correspondences -------------------------------------------------------------


def test_reference_map_and_identical_query_give_the_identity():
    index_map = reference_index_map(64, 64, CropBox(0, 0, 64, 64), grid=4)
    assert index_map[0, 0] == 0 and index_map[15, 16] == 1 and index_map[16, 15] == 4 and index_map[63, 63] == 15
    assert query_positions(index_map, CropBox(0, 0, 64, 64), 4, flip=False).tolist() == list(range(16))
    flipped = query_positions(index_map, CropBox(0, 0, 64, 64), 4, flip=True).reshape(4, 4)
    assert flipped.tolist() == np.arange(16).reshape(4, 4)[:, ::-1].tolist()


def test_query_outside_the_reference_is_minus_one_and_partial_overlap_is_exact():
    index_map = reference_index_map(64, 64, CropBox(0, 0, 64, 32), grid=4)  # the left half
    assert (index_map[:, 32:] == -1).all()
    assert (query_positions(index_map, CropBox(0, 32, 64, 32), 2, flip=False) == -1).all()
    # Whole-image query, 2x2 patches centred on pixels 16 and 48: the left ones fall in the
    # reference at rows floor(16.5 * 4 / 64) = 1 / 3 and column floor(16.5 * 4 / 32) = 2.
    assert query_positions(index_map, CropBox(0, 0, 64, 64), 2, flip=False).tolist() == [6, -1, 14, -1]
    assert query_positions(index_map, CropBox(0, 0, 64, 64), 2, flip=True).tolist() == [-1, 6, -1, 14]


def test_zoomed_in_query_maps_onto_the_reference_patches_it_covers():
    index_map = reference_index_map(64, 64, CropBox(16, 16, 32, 32), grid=4)  # 8 px reference patches
    assert query_positions(index_map, CropBox(16, 16, 16, 16), 2, flip=False).tolist() == [0, 1, 4, 5]
    assert query_positions(index_map, CropBox(40, 40, 24, 24), 3, flip=False).tolist() == [15, -1, -1, -1, -1, -1, -1, -1, -1]


def test_crop_boxes_stay_inside_the_image_within_their_area_range():
    rng = np.random.RandomState(0)
    for _ in range(200):
        box = sample_crop_box(rng, 120, 200, (0.05, 0.32))
        assert 0 <= box.top and box.top + box.height <= 120 and 0 <= box.left and box.left + box.width <= 200
        assert 0.04 <= box.height * box.width / (120 * 200) <= 0.34


def _gradient_image(path, size=256):
    """R = x, G = y: a patch's mean colour says where in the image it was cut from."""
    y, x = np.mgrid[0:size, 0:size]
    Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)).save(path)


def test_mapper_correspondences_point_at_the_same_image_content(tmp_path):
    _gradient_image(tmp_path / "gradient.png")
    cfg = tiny_cfg("INPUT.LOCA.REFERENCE_SIZE", "128", "INPUT.LOCA.QUERY_SIZE", "128", "INPUT.LOCA.FOCAL_SIZE", "64",
                   "INPUT.LOCA.NUM_FOCAL_QUERIES", "4", "INPUT.LOCA.QUERY_TOKENS_KEPT", "20")
    np.random.seed(0)  # training views: numpy's global generator
    kwargs = LocaViewMapper.from_config(cfg, is_train=True)
    kwargs.update(reference_colors=NO_COLORS, query_colors=NO_COLORS, large_query_colors=NO_COLORS)
    mapper = LocaViewMapper(**kwargs)
    checked = 0
    for index in range(6):
        views = mapper({"file_name": str(tmp_path / "gradient.png"), "image_id": index})
        assert views["reference"].shape == (3, 128, 128) and views["reference"].dtype == torch.uint8
        assert views["focal_queries"].shape == (4, 3, 64, 64) and views["focal_positions"].shape == (4, 16)
        assert views["query_keep"].shape == (20,) and len(set(views["query_keep"].tolist())) == 20
        assert 0 <= views["reference_keep_start"] <= 64 - int(0.2 * 64)

        def patch_centres(image, grid):  # [2, grid * grid]: mean (x, y) image coordinate of each patch
            patches = image[:2].float().reshape(2, grid, image.shape[1] // grid, grid, image.shape[2] // grid)
            return patches.mean(dim=(2, 4)).reshape(2, -1)

        reference_centres = patch_centres(views["reference"], 8)
        pairs = [(views["query"], views["query_positions"], 8)]
        pairs += [(view, positions, 4) for view, positions in zip(views["focal_queries"], views["focal_positions"])]
        for query, positions, grid in pairs:
            query_centres = patch_centres(query, grid)
            for patch, position in enumerate(positions.tolist()):
                if position < 0:
                    continue
                # Within half a reference patch plus half a query patch (<= 256 / 8 / 2 each).
                assert (query_centres[:, patch] - reference_centres[:, position]).abs().max() <= 33
                checked += 1
    assert checked > 100


def test_evaluation_views_are_fixed_wherever_the_dataset_lies_and_training_views_differ(tmp_path):
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
        _gradient_image(tmp_path / root / "gradient.png", size=96)
    record = {"file_name": str(tmp_path / "a" / "gradient.png"), "image_id": 0}
    moved = {"file_name": str(tmp_path / "b" / "gradient.png"), "image_id": 0}
    test_mapper = LocaViewMapper(tiny_cfg(), is_train=False)
    first, second, elsewhere = test_mapper(record), test_mapper(record), test_mapper(moved)
    for views in (second, elsewhere):
        assert torch.equal(first["query"], views["query"])
        assert torch.equal(first["query_positions"], views["query_positions"])
    other_image = test_mapper({**record, "image_id": 1})
    assert not torch.equal(first["query_positions"], other_image["query_positions"])
    train_mapper = LocaViewMapper(tiny_cfg(), is_train=True)
    assert not torch.equal(train_mapper(record)["query"], train_mapper(record)["query"])


def test_color_augmentations_keep_the_range_and_greyscale_is_grey():
    rng = np.random.RandomState(0)
    view = torch.rand(3, 16, 16)
    jittered = augment_colors(view, ColorAugmentation(jitter_prob=1.0, grayscale_prob=0.0), rng)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.equal(jittered, view)
    grey = augment_colors(view, ColorAugmentation(jitter_prob=0.0, grayscale_prob=1.0), rng)
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    solarized = augment_colors(view, ColorAugmentation(jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=1.0), rng)
    assert torch.equal(solarized, torch.where(view < 0.5, view, 1 - view))


def test_unreadable_files_are_reported_and_skipped(tmp_path, caplog):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    mapper = build_mapper(tiny_cfg(), is_train=True)  # the LOCA configs skip unreadable files
    with caplog.at_level(logging.WARNING):
        assert mapper({"file_name": str(tmp_path / "broken.jpg"), "image_id": 0}) is None
        assert mapper({"file_name": str(tmp_path / "empty.png"), "image_id": 1}) is None
    assert mapper.num_skipped == 2
    assert "broken.jpg" in caplog.text and "empty.png" in caplog.text and "2 unreadable image(s) skipped" in caplog.text
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        build_mapper(tiny_cfg("DATALOADER.SKIP_UNREADABLE_IMAGES", "False"), is_train=True)(
            {"file_name": str(tmp_path / "broken.jpg"), "image_id": 0}
        )


def test_image_folders_are_listed_recursively_and_registered_by_name(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/one.JPG", "a/b/two.png", "three.jpeg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [os.path.relpath(f, tmp_path) for f in list_images(str(tmp_path))] == ["three.jpeg", "a/one.JPG", "a/b/two.png"]
    name = f"folder:{tmp_path}"
    cfg = kmax_m2f.build_config(str(REPO / CONFIG), ["DATASETS.TRAIN", f"('{name}',)"])
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    assert len(records) == 3 and {"file_name", "image_id"} <= set(records[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        list_images(str(tmp_path / "empty"))


# --- losses, Sinkhorn, teacher -------------------------------------------------------------


def test_localization_loss_ignores_patches_outside_the_reference():
    logits = torch.randn(6, 5)
    positions = torch.tensor([0, -1, 3, -1, 4, 2])
    loss, correct = localization_loss(logits, positions)
    valid = positions >= 0
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits[valid], positions[valid]))
    changed = logits.clone()
    changed[~valid] = 100.0
    assert torch.allclose(localization_loss(changed, positions)[0], loss)
    assert int(correct) == int((logits[valid].argmax(-1) == positions[valid]).sum())
    empty_loss, empty_correct = localization_loss(logits.requires_grad_(), torch.full((6,), -1))
    assert empty_loss.item() == 0 and empty_correct == 0
    empty_loss.backward()  # still part of the graph: every process runs the same backward


def test_cluster_loss_uses_valid_patches_only_and_me_max_is_negative_entropy_of_the_mean():
    student = torch.randn(5, 8)
    targets = torch.softmax(torch.randn(5, 8), -1)
    positions = torch.tensor([1, -1, 0, 2, -1])
    cross_entropy, neg_entropy = cluster_prediction_losses(student, targets, positions, 0.1)
    log_probs = torch.log_softmax(student / 0.1, -1)
    valid = positions >= 0
    assert torch.allclose(cross_entropy, -(targets[valid] * log_probs[valid]).sum(-1).mean())
    other_targets = targets.clone()
    other_targets[~valid] = 0.5
    assert torch.allclose(cluster_prediction_losses(student, other_targets, positions, 0.1)[0], cross_entropy)
    mean = log_probs.exp().mean(0)
    assert torch.allclose(neg_entropy, (mean * mean.log()).sum())
    assert torch.allclose(global_mean(log_probs.exp()), mean)


def test_sinkhorn_rows_sum_to_one_and_columns_balance():
    torch.manual_seed(0)
    assignments = torch.softmax(torch.randn(64, 16) * 3 + torch.linspace(0, 4, 16), -1)
    balanced = sinkhorn(assignments, iterations=3)
    assert torch.allclose(balanced.sum(1), torch.ones(64), atol=1e-5)
    before = assignments.sum(0).std() / assignments.sum(0).mean()
    after = balanced.sum(0).std() / balanced.sum(0).mean()
    assert after < before / 3
    converged = sinkhorn(assignments, iterations=200)
    assert torch.allclose(converged.sum(0), torch.full((16,), 64 / 16), atol=1e-3)
    # One iteration: columns divided by their totals, then rows by theirs.
    columns = assignments / assignments.sum(0, keepdim=True)
    assert torch.allclose(sinkhorn(assignments, iterations=1), columns / columns.sum(1, keepdim=True))


def test_teacher_momentum_rises_from_its_base_to_one_along_a_cosine():
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert teacher_momentum(25, 100, 0.996) == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)


def test_teacher_is_a_frozen_copy_moved_by_the_ema_update():
    model = build_model(tiny_cfg())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    student = dict(model.backbone.named_parameters())
    teacher = dict(model.teacher["backbone"].named_parameters())
    assert all(torch.equal(teacher[name], student[name]) for name in student)
    before = {name: t.clone() for name, t in teacher.items()}
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
        for p in model.projection_head.parameters():
            p.add_(1.0)
    model.update_teacher(0.9)
    for name in student:
        assert torch.allclose(teacher[name], 0.9 * before[name] + 0.1 * student[name], atol=1e-6)
    head = dict(model.projection_head.named_parameters())
    for name, param in model.teacher["projection_head"].named_parameters():
        assert torch.allclose(param, 0.9 * (head[name] - 1.0) + 0.1 * head[name], atol=1e-6)


# --- the model -----------------------------------------------------------------------------


def _batch(cfg, tmp_path, count=2, size=96):
    mapper = LocaViewMapper(cfg, is_train=True)
    files = []
    for index in range(count):
        path = tmp_path / f"image{index}.png"
        Image.fromarray(np.random.RandomState(index).randint(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    return [mapper({"file_name": f, "image_id": i}) for i, f in enumerate(files)]


def test_position_head_sees_39_contiguous_teacher_tokens_of_196(tmp_path):
    cfg = tiny_cfg("INPUT.LOCA.REFERENCE_SIZE", "224", "INPUT.LOCA.QUERY_SIZE", "64", "MODEL.VIT.DEPTH", "1")
    model = build_model(cfg)
    assert model.reference_tokens_kept == 39 and model.num_reference_positions == 196
    batch = _batch(cfg, tmp_path, size=256)
    seen = []
    model.position_head.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    teacher_tokens = []
    model.teacher["backbone"].layers[-1].register_forward_hook(lambda module, args, out: teacher_tokens.append(out))
    model.eval()
    with torch.no_grad():
        model(batch)
    reference = model.teacher["backbone"].ln1(teacher_tokens[0][:, 1:])  # the class token dropped
    for image, views in enumerate(batch):
        start = views["reference_keep_start"]
        assert seen[0].shape[1] == 39
        assert torch.allclose(seen[0][image], reference[image, start:start + 39], atol=1e-5)


def test_training_losses_gradients_and_the_student_only_learns(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    model.train()
    losses = model(_batch(cfg, tmp_path))
    assert set(losses) == {"loss_localization", "loss_cluster", "loss_me_max"}
    assert losses["loss_localization"].item() == pytest.approx(math.log(16), rel=0.3)
    assert losses["loss_me_max"].item() <= 0
    sum(losses.values()).backward()
    assert model.backbone.patch_embed.projection.weight.grad is not None
    assert model.projection_head.prototypes.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())


def test_without_cluster_loss_there_is_no_projection_head(tmp_path):
    cfg = tiny_cfg("MODEL.LOCA.CLUSTER_LOSS", "False")
    model = build_model(cfg)
    assert model.projection_head is None and "projection_head" not in model.teacher
    assert set(model(_batch(cfg, tmp_path))) == {"loss_localization"}


def test_inference_counts_valid_and_correct_patches_per_image(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    batch = _batch(cfg, tmp_path, count=3)
    with torch.no_grad():
        outputs = model(batch)
    assert len(outputs) == 3
    for views, output in zip(batch, outputs):
        positions = torch.cat([views["query_positions"][views["query_keep"]], views["focal_positions"].flatten()])
        assert output["localization"]["valid"] == int((positions >= 0).sum())
        assert 0 <= output["localization"]["correct"] <= output["localization"]["valid"]
    evaluator = build_evaluator(cfg, cfg.DATASETS.TEST[0])
    assert isinstance(evaluator, LocalizationEvaluator)
    evaluator.reset()
    evaluator.process(batch, outputs)
    result = evaluator.evaluate()["localization"]
    total = sum(o["localization"]["valid"] for o in outputs)
    assert result["patches"] == total and result["chance"] == pytest.approx(100 / 16)


def test_no_weight_decay_on_biases_and_norms():
    model = build_model(tiny_cfg())
    groups = build_param_groups(model, 1e-3, 0.1, 0.1, 0.1, 1.0)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert decay_of[id(param)] == (0.0 if param.ndim <= 1 else 0.1), name
    assert all(id(p) not in decay_of for p in model.teacher.parameters())


def test_a_cnn_backbone_or_another_mapper_is_refused():
    with pytest.raises(ValueError, match="DATASET_MAPPER_NAME"):
        build_model(tiny_cfg("INPUT.DATASET_MAPPER_NAME", "mask_former_semantic"))


# --- pre-training, export, resume ----------------------------------------------------------


def test_short_pretraining_lifts_localization_far_above_chance(synthetic_prefix, tmp_path):
    # The 16 training images, scored on views the training never drew (seeded by the record); the
    # whole reference visible and no colour distortion, so that a few hundred steps suffice. The
    # initialisation and the training draws are seeded too, so that the figures are reproducible.
    seed_all_rng(0)
    train_set = f"('{synthetic_prefix}_sem_seg_train',)"
    cfg = tiny_cfg(
        "DATASETS.TRAIN", train_set, "DATASETS.TEST", train_set, "MODEL.LOCA.REFERENCE_KEEP_RATIO", "1.0",
        "INPUT.LOCA.COLOR_JITTER_PROB", "0.0", "INPUT.LOCA.GRAYSCALE_PROB", "0.0", "INPUT.LOCA.SOLARIZE_PROB", "0.0",
        "SOLVER.MAX_ITER", "500", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.WARMUP_ITERS", "10", "SOLVER.BASE_LR", "0.002",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "OUTPUT_DIR", str(tmp_path),
    )
    trainer = Trainer(cfg)
    before = Trainer.test(cfg, trainer.model)["localization"]["top1"]
    trainer.train()
    after = Trainer.test(cfg, trainer.model)["localization"]["top1"]
    chance = 100 / 16
    assert after > 3 * chance and after > before + 2 * chance, (before, after)


def test_export_loads_into_struct_token_with_no_missing_backbone_key(tmp_path):
    model = build_model(tiny_cfg())
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.5)
    torch.save({"model": model.state_dict(), "iteration": 3}, tmp_path / "loca.pth")
    output = tmp_path / "vit.pth"
    run_tool(["tools/export_loca_backbone.py", "--config-file", STRUCT_TOKEN_CONFIG, "--input", str(tmp_path / "loca.pth"),
              "--output", str(output), "--opts", "MODEL.VIT.FINAL_NORM", "True"], REPO, REPO)
    target_cfg = kmax_m2f.build_config(str(REPO / STRUCT_TOKEN_CONFIG), ["MODEL.VIT.FINAL_NORM", "True"])
    target = build_model(target_cfg)
    incompatible = target.load_state_dict(torch.load(output)["model"], strict=False)
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    assert not incompatible.unexpected_keys
    teacher = model.teacher["backbone"].state_dict()
    for name, tensor in target.backbone.state_dict().items():
        assert torch.allclose(tensor, teacher[name]), name  # the teacher, at the same 64 px grid
    student = run_tool(["tools/export_loca_backbone.py", "--encoder", "student", "--config-file", STRUCT_TOKEN_CONFIG,
                        "--input", str(tmp_path / "loca.pth"), "--output", str(tmp_path / "student.pth")], REPO, REPO)
    assert "ln1" in student.stderr + student.stdout  # the final norm left out, with a warning
    exported = torch.load(tmp_path / "student.pth")["model"]
    assert torch.equal(exported["backbone.layers.0.ln1.weight"], model.backbone.layers[0].ln1.weight)
    assert "backbone.ln1.weight" not in exported


def test_export_resamples_the_position_embedding_and_refuses_other_files(tmp_path):
    cfg = tiny_cfg()
    state = build_model(cfg).state_dict()
    target_cfg = kmax_m2f.build_config(str(REPO / STRUCT_TOKEN_CONFIG), ["MODEL.VIT.IMG_SIZE", "[96, 96]"])
    exported = export_backbone({"model": state}, target_cfg)
    assert exported["backbone.pos_embed"].shape == (1, 1 + 36, 32)
    with pytest.raises(ValueError, match="not a LOCA checkpoint"):
        export_backbone({"model": {"sem_seg_head.x": torch.zeros(1)}}, target_cfg)
    torch.save({"model": {"sem_seg_head.x": torch.zeros(1)}}, tmp_path / "other.pth")
    result = run_tool(["tools/export_loca_backbone.py", "--config-file", STRUCT_TOKEN_CONFIG, "--input",
                       str(tmp_path / "other.pth"), "--output", str(tmp_path / "out.pth")], REPO, REPO, check=False)
    assert result.returncode != 0 and "not a LOCA checkpoint" in result.stderr


def test_pretraining_resumes_with_its_teacher_and_iteration(synthetic_prefix, tmp_path):
    opts = ["DATASETS.TRAIN", f"('{synthetic_prefix}_sem_seg_train',)", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"]
    trainer = Trainer(tiny_cfg(*opts))
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert not torch.equal(saved["teacher.backbone.pos_embed"], saved["backbone.pos_embed"])
    resumed = Trainer(tiny_cfg(*opts[:-4], "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1"))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    model = resumed.model
    assert torch.equal(model.teacher["backbone"].pos_embed, saved["teacher.backbone.pos_embed"])
    resumed.train()
    assert resumed.iter == 4


def test_export_names_the_vit_after_the_target_models_backbone_module():
    state = build_model(tiny_cfg()).state_dict()
    restr_cfg = kmax_m2f.build_config(str(REPO / "configs/synthetic/referring-segmentation/restr_vit_synthetic.yaml"))
    exported = export_backbone({"model": state}, restr_cfg)
    assert exported and all(key.startswith("encoder_v.") for key in exported)
    assert "encoder_v.layers.0.ln1.weight" in exported


def test_loca_transfer_pretrains_exports_and_fine_tunes_from_loca_and_from_scratch(datasets_dir, tmp_path):
    # The tool of `make quickstart MODEL=loca`, on the tiny configs: --pretrain-opts reach the
    # pre-training, --finetune-opts both fine-tunings, and only the LOCA one loads the export.
    out = tmp_path / "transfer"
    result = run_tool(["tools/loca_transfer.py", "--output-dir", str(out), "--seed", "5",
                       "--pretrain-config", CONFIG, "--finetune-config", STRUCT_TOKEN_CONFIG,
                       "--pretrain-opts", "SOLVER.MAX_ITER", "2",
                       "--finetune-opts", "SOLVER.MAX_ITER", "2", "MODEL.STRUCT_TOKEN.NUM_LAYERS", "1"],
                      datasets_dir, REPO)
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["seed"] == 5 and 0 <= results["pretrain"]["localization/top1"] <= 100
    summary = result.stdout + result.stderr
    weights = out / "loca_vit_teacher.pth"
    assert any(key.startswith("backbone.") for key in torch.load(weights)["model"])
    for name, expected_weights in (("loca", str(weights)), ("scratch", "")):
        assert 0 <= results[f"finetune_{name}"]["sem_seg/mIoU"] <= 100
        cfg = kmax_m2f.build_config(str(out / f"finetune_{name}" / "config.yaml"))
        assert (cfg.MODEL.WEIGHTS, cfg.SEED, cfg.SOLVER.MAX_ITER) == (expected_weights, 5, 2)
        assert cfg.MODEL.STRUCT_TOKEN.NUM_LAYERS == 1 and cfg.MODEL.VIT.FINAL_NORM
        assert f"Fine-tuned from {name}" in summary
    pretrain_cfg = kmax_m2f.build_config(str(out / "pretrain" / "config.yaml"))
    assert (pretrain_cfg.SOLVER.MAX_ITER, pretrain_cfg.SEED) == (2, 5)
