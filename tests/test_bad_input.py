"""Bad input gets one clear error that names the file or key and the fix."""
import json
import shutil

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from panopticapi.utils import id2rgb
from PIL import Image

import kmax_m2f
from kmax_m2f.config import ConfigError
from kmax_m2f.data.datasets.checks import DatasetError
from kmax_m2f.data.datasets.synthetic import register_synthetic
from kmax_m2f.data.panoptic import read_panoptic_ids

from .conftest import REPO, run_tool


def test_missing_dataset_root_names_the_folder_and_the_variable(tmp_path):
    register_synthetic(str(tmp_path / "nowhere"), prefix="pytest_missing")
    with pytest.raises(DatasetError, match=r"nowhere.*does not exist.*DETECTRON2_DATASETS.*prepare_synthetic"):
        DatasetCatalog.get("pytest_missing_panoptic_train")
    with pytest.raises(DatasetError, match="DETECTRON2_DATASETS"):
        DatasetCatalog.get("pytest_missing_sem_seg_val")
    with pytest.raises(DatasetError, match=r"nowhere/val.*does not exist"):
        DatasetCatalog.get("pytest_missing_instance_val")


def test_corrupt_json_names_the_file(tmp_path, datasets_dir):
    root = tmp_path / "synthetic"
    shutil.copytree(datasets_dir / "synthetic", root)
    panoptic_json = root / "annotations" / "panoptic_val.json"
    panoptic_json.write_text(panoptic_json.read_text()[:100])
    instances_json = root / "annotations" / "instances_val.json"
    instances_json.write_text("{not json")
    register_synthetic(str(root), prefix="pytest_corrupt")
    with pytest.raises(DatasetError, match=r"panoptic_val\.json.*not valid JSON.*corrupt"):
        DatasetCatalog.get("pytest_corrupt_panoptic_val")
    with pytest.raises(DatasetError, match=r"instances_val\.json.*not valid JSON"):
        DatasetCatalog.get("pytest_corrupt_instance_val")


def test_panoptic_png_with_ids_missing_from_the_json(tmp_path):
    ids = np.zeros((8, 8), np.int64)
    ids[:4] = 3
    ids[4:] = 77
    png = tmp_path / "000001.png"
    Image.fromarray(id2rgb(ids)).save(png)
    with pytest.raises(DatasetError, match=r"000001\.png contains segment ids \[77\].*regenerate"):
        read_panoptic_ids(str(png), [{"id": 3, "category_id": 1}])
    assert (read_panoptic_ids(str(png), [{"id": 3}, {"id": 77}]) == ids).all()


def test_panoptic_png_of_another_image_is_caught_by_the_areas(tmp_path):
    """Its ids are a subset of the JSON's, so only the areas tell: one listed segment has no pixel."""
    ids = np.zeros((8, 8), np.int64)
    ids[:4] = 3
    png = tmp_path / "000002.png"
    Image.fromarray(id2rgb(ids)).save(png)
    segments = [{"id": 3, "category_id": 1, "area": 32}, {"id": 9, "category_id": 2, "area": 20}]
    with pytest.raises(DatasetError, match=r"000002\.png: segment 9 \(category 2\) covers 0 pixels, but its JSON "
                                           r"segments_info gives area 20"):
        read_panoptic_ids(str(png), segments)
    segments[1]["area"] = 0  # listed but empty in the JSON too: consistent
    segments[0]["area"] = 33  # one pixel off: within the tolerance
    assert (read_panoptic_ids(str(png), segments) == ids).all()


def test_unknown_config_key_names_the_key_and_the_file(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(f"_BASE_: {REPO / 'tests/configs/tiny_sem_seg_fpn.yaml'}\nSOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*SOLVER\.BASE_LRR"):
        kmax_m2f.build_config(str(config))
    with pytest.raises(ConfigError, match=r"MODEL\.MASK_FORMER\.TEST\.PANOPTIC"):
        kmax_m2f.build_config("", ["MODEL.MASK_FORMER.TEST.PANOPTIC", "True"])
    with pytest.raises(ConfigError, match="does not exist"):
        kmax_m2f.build_config(str(tmp_path / "absent.yaml"))


def test_train_net_reports_a_bad_key_in_one_line(tmp_path, datasets_dir):
    result = run_tool(
        ["tools/train_net.py", "--config-file", "tests/configs/tiny_sem_seg_fpn.yaml", "SOLVER.MAX_ITERS", "5"],
        datasets_dir, REPO, check=False,
    )
    assert result.returncode != 0
    assert "train_net.py: command-line override" in result.stderr and "SOLVER.MAX_ITERS" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_type_in_config_is_reported():
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER"):
        kmax_m2f.build_config("", ["SOLVER.MAX_ITER", "'many'"])


def test_cuda_device_falls_back_to_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert kmax_m2f.build_config("", ["MODEL.DEVICE", "cuda"]).MODEL.DEVICE == "cpu"


def test_json_stays_untouched_after_a_failed_load(tmp_path, datasets_dir):
    """Nothing is lost: a failed load never rewrites the user's files."""
    root = tmp_path / "synthetic"
    shutil.copytree(datasets_dir / "synthetic", root)
    (root / "panoptic_semseg_val").rename(root / "moved_away")
    before = (root / "annotations" / "panoptic_val.json").read_bytes()
    register_synthetic(str(root), prefix="pytest_no_semseg")
    with pytest.raises(DatasetError, match="panoptic_semseg_val"):
        DatasetCatalog.get("pytest_no_semseg_panoptic_val")
    assert (root / "annotations" / "panoptic_val.json").read_bytes() == before
    assert json.loads(before)["annotations"]


def test_wrong_num_classes_stops_before_training(synthetic_prefix):
    from detectron2.modeling import build_model

    cfg = kmax_m2f.build_config(str(REPO / "tests/configs/tiny_maskformer_panoptic.yaml"), [
        "DATASETS.TRAIN", f"('{synthetic_prefix}_panoptic_train',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "80",
    ])
    with pytest.raises(ValueError, match=r"NUM_CLASSES=80.*has 8 classes.*NUM_CLASSES 8"):
        build_model(cfg)


# --------------------------------------------------------------------------- untrained models
TINY = "tests/configs/tiny_maskformer_panoptic.yaml"


def test_demo_without_weights_refuses_unless_asked(datasets_dir, tmp_path):
    image = str(datasets_dir / "synthetic" / "val" / "000001.jpg")
    args = ["tools/demo.py", "--config-file", TINY, "--input", image, "--output", str(tmp_path)]
    result = run_tool(args, datasets_dir, REPO, check=False)
    assert result.returncode != 0
    assert "MODEL.WEIGHTS is empty" in result.stderr and "--allow-random-weights" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "000001.png").exists()

    result = run_tool(args + ["--allow-random-weights"], datasets_dir, REPO)
    assert "untrained model (random weights)" in result.stdout + result.stderr
    assert (tmp_path / "000001.png").is_file()


def test_eval_only_without_weights_refuses_unless_asked(datasets_dir, tmp_path):
    args = ["tools/train_net.py", "--config-file", TINY, "--eval-only", "OUTPUT_DIR", str(tmp_path)]
    result = run_tool(args, datasets_dir, REPO, check=False)
    assert result.returncode != 0
    assert "--eval-only with an empty MODEL.WEIGHTS evaluates an untrained model" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_tool(args[:4] + ["--allow-random-weights"] + args[4:], datasets_dir, REPO)
    assert "evaluates an untrained model (random weights)" in result.stdout + result.stderr
    assert "copypaste: Task: panoptic_seg" in result.stdout + result.stderr


# --------------------------------------------------------------------------- 16-bit images
def _write_16_bit_png(path, height: int = 32, width: int = 48) -> np.ndarray:
    """A 16-bit grey PNG whose values run from 0 to 65535 along the rows; returns the values."""
    values = np.linspace(0, 65535, height * width).round().astype(np.uint16).reshape(height, width)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    return values


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    from kmax_m2f.data.images import read_image, to_8_bit
    from kmax_m2f.data.mappers.common import read_image as mapper_read_image

    values = _write_16_bit_png(tmp_path / "grey16.png")
    expected = np.rint(values / 257.0).astype(np.uint8)
    for image in (read_image(str(tmp_path / "grey16.png"), format="BGR"),
                  mapper_read_image({"file_name": str(tmp_path / "grey16.png"), "height": 32, "width": 48}, "RGB")):
        assert image.shape == (32, 48, 3) and image.dtype == np.uint8
        assert all(np.array_equal(image[..., c], expected) for c in range(3))  # detectron2's reader: all 255
    # 32-bit integer and float grey images: scaled by the range their values fit.
    assert np.asarray(to_8_bit(Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I"))).tolist() == [[0, 100, 255]]
    assert np.asarray(to_8_bit(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F"))).tolist() == [[0, 128, 255]]
    assert to_8_bit(Image.new("RGB", (2, 2))).mode == "RGB"


def test_demo_draws_a_16_bit_image(datasets_dir, tmp_path):
    _write_16_bit_png(tmp_path / "grey16.png")
    run_tool(["tools/demo.py", "--config-file", TINY, "--input", str(tmp_path / "grey16.png"), "--output",
              str(tmp_path / "out"), "--allow-random-weights"], datasets_dir, REPO)
    drawing = np.asarray(Image.open(tmp_path / "out" / "grey16.png"))
    assert drawing.shape[:2] == (32, 48) and drawing.min() < 200  # not a white picture


def test_tool_options_after_the_overrides_are_named(datasets_dir, tmp_path):
    result = run_tool(["tools/train_net.py", "--config-file", TINY, "OUTPUT_DIR", str(tmp_path), "--resume"],
                      datasets_dir, REPO, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "['--resume'] came after the KEY VALUE overrides" in result.stderr
    assert "--config-file FILE --resume KEY VALUE" in result.stderr


def test_a_diverged_loss_is_one_line_with_the_iteration_and_a_hint(datasets_dir, tmp_path):
    args = ["tools/train_net.py", "--config-file", "tests/configs/tiny_sem_seg_fpn.yaml", "OUTPUT_DIR", str(tmp_path),
            "SOLVER.BASE_LR", "1e12", "SOLVER.MAX_ITER", "30"]
    result = run_tool(args, datasets_dir, REPO, check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train_net.py: Loss became infinite or NaN at iteration=")
    assert "SOLVER.BASE_LR" in last_line and "Traceback" not in result.stderr
    debug = run_tool(args[:1] + ["--debug"] + args[1:], datasets_dir, REPO, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FloatingPointError" in debug.stderr


def test_tools_print_no_import_warnings_and_train_net_help_has_the_usage(datasets_dir):
    for tool in ("tools/train_net.py", "tools/demo.py", "tools/convert_structtoken.py"):
        result = run_tool([tool, "--help"], datasets_dir, REPO)
        assert "is deprecated" not in result.stderr, (tool, result.stderr)
    usage = run_tool(["tools/train_net.py", "--help"], datasets_dir, REPO).stdout
    assert "python tools/train_net.py --config-file configs/... --eval-only MODEL.WEIGHTS model.pth" in usage


def test_missing_base_names_the_yaml_that_refers_to_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "Base.yaml").write_text("_BASE_: Missing-Base.yaml\n")
    (tmp_path / "sub" / "model.yaml").write_text("_BASE_: ../Base.yaml\n")
    with pytest.raises(ConfigError, match=r"Base\.yaml: its _BASE_ 'Missing-Base\.yaml' \(.*Missing-Base\.yaml\) does not exist"):
        kmax_m2f.build_config(str(tmp_path / "sub" / "model.yaml"))


TINY_FPN = "tests/configs/tiny_sem_seg_fpn.yaml"


def _one_line_failure(args, datasets_dir) -> str:
    result = run_tool(args, datasets_dir, REPO, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_output_dir_that_cannot_be_created(datasets_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    line = _one_line_failure(["tools/train_net.py", "--config-file", TINY_FPN, "OUTPUT_DIR", str(tmp_path / "a_file" / "out")],
                             datasets_dir)
    assert line.startswith("train_net.py: OUTPUT_DIR") and "cannot be created or written" in line


def test_catalog_dataset_without_its_files_names_the_folder_and_the_readme(tmp_path):
    line = _one_line_failure(["tools/train_net.py", "--config-file", TINY_FPN, "OUTPUT_DIR", str(tmp_path / "out"),
                              "DATASETS.TRAIN", "('ade20k_sem_seg_train',)"], tmp_path / "no_datasets")
    assert "Dataset 'ade20k_sem_seg_train'" in line and "ADEChallengeData2016" in line
    assert "$DETECTRON2_DATASETS" in line and "datasets/README.md" in line


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unreadable_training_image_is_named(datasets_dir, tmp_path, damage):
    shutil.copytree(datasets_dir / "synthetic", tmp_path / "synthetic")
    image = tmp_path / "synthetic" / "train" / "000002.jpg"
    image.write_bytes(b"" if damage == "empty" else image.read_bytes()[:200])
    # The project's mappers read images (detectron2_default, detectron2's own mapper, does not).
    line = _one_line_failure(["tools/train_net.py", "--config-file", "tests/configs/tiny_struct_token.yaml",
                              "OUTPUT_DIR", str(tmp_path / "out"), "DATALOADER.NUM_WORKERS", "1"], tmp_path)
    assert line.startswith(f"train_net.py: Image {image}") and ("empty" if damage == "empty" else "truncated") in line


def test_unreadable_training_images_are_skipped_and_counted_when_asked(datasets_dir, tmp_path):
    shutil.copytree(datasets_dir / "synthetic", tmp_path / "synthetic")
    image = tmp_path / "synthetic" / "train" / "000002.jpg"
    image.write_bytes(image.read_bytes()[:200])
    result = run_tool(["tools/train_net.py", "--config-file", "tests/configs/tiny_struct_token.yaml",
                       "OUTPUT_DIR", str(tmp_path / "out"), "DATALOADER.NUM_WORKERS", "0",
                       "DATALOADER.SKIP_UNREADABLE_IMAGES", "True"], tmp_path, REPO)
    log = result.stdout + result.stderr
    assert f"Skipped: Image {image} cannot be decoded" in log
    assert "1 unreadable image(s) skipped so far in this process" in log


def test_demo_expands_folders_and_globs_and_names_a_bad_output(datasets_dir, tmp_path):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for name in ("a.png", "nested/b.jpg"):
        Image.new("RGB", (48, 32), (90, 140, 60)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    common = ["tools/demo.py", "--config-file", TINY, "--allow-random-weights", "--output"]
    run_tool(common + [str(tmp_path / "out_folder"), "--input", str(images)], datasets_dir, REPO)
    assert sorted(p.name for p in (tmp_path / "out_folder").iterdir()) == ["a.png", "b.png"]
    run_tool(common + [str(tmp_path / "out_glob"), "--input", str(images / "**" / "*.jpg")], datasets_dir, REPO)
    assert [p.name for p in (tmp_path / "out_glob").iterdir()] == ["b.png"]

    line = _one_line_failure(common + [str(tmp_path / "out_none"), "--input", str(images / "*.bmp")], datasets_dir)
    assert line == f"demo.py: --input pattern {str(images / '*.bmp')!r} matches no file."
    line = _one_line_failure(common + [str(images / "a.png" / "out"), "--input", str(images / "a.png")], datasets_dir)
    assert line.startswith(f"demo.py: --output {str(images / 'a.png' / 'out')!r} cannot be created")


def test_kmax_test_image_larger_than_its_input_size_is_one_line(datasets_dir, tmp_path):
    line = _one_line_failure(["tools/train_net.py", "--config-file", "tests/configs/tiny_kmax_panoptic.yaml", "--eval-only",
                              "--allow-random-weights", "OUTPUT_DIR", str(tmp_path), "INPUT.MIN_SIZE_TEST", "128",
                              "INPUT.MAX_SIZE_TEST", "128"], datasets_dir)
    assert line.startswith("train_net.py: an input image of 128x128 exceeds the fixed input size INPUT.IMAGE_SIZE=64x64")


def test_compare_official_without_the_official_code_says_what_it_needs(datasets_dir):
    line = _one_line_failure(["tools/benchmark.py", "compare-official", "--cases", "op-local,kmax-inference-641"],
                             datasets_dir)
    assert "--official-root DIR for a checkout of" in line
    assert "facebookresearch/Mask2Former" in line and "bytedance/kmax-deeplab" in line
