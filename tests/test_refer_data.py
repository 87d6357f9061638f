"""Referring datasets and evaluation: the refer-format loaders (RefCOCO family, ReferIt) on tiny
fake trees in the published formats, the synthetic referring set, ReferringEvaluator against
hand-computed values, and the trivial baselines."""
import json
import pickle

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from kmax_m2f.data.datasets.checks import DatasetError
from kmax_m2f.data.datasets.refer import load_refer, load_referit, referent_mask, register_refer
from kmax_m2f.data.synthetic_refer import colour_name, describe_segments
from kmax_m2f.evaluation.referring import ReferringEvaluator, referring_metrics, trivial_baselines


def _fake_refcoco(root, extra_ref=None):
    """refer/refcoco/{instances.json, refs(unc).p} and coco/train2014 with two images: one
    polygon annotation, one uncompressed-RLE annotation (crowd-style), as the published files."""
    images_dir = root / "coco" / "train2014"
    images_dir.mkdir(parents=True)
    folder = root / "refer" / "refcoco"
    folder.mkdir(parents=True)
    images = []
    for image_id, (h, w) in ((9, (20, 30)), (25, (16, 16))):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    square = np.zeros((16, 16), np.uint8)
    square[4:8, 4:12] = 1
    uncompressed = {"size": [16, 16], "counts": _uncompressed_counts(square)}
    annotations = [
        {"id": 100, "image_id": 9, "category_id": 1, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]], "iscrowd": 0},
        {"id": 101, "image_id": 25, "category_id": 1, "segmentation": uncompressed, "iscrowd": 1},
    ]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": [{"id": 1, "name": "person"}]}))
    refs = [
        {"ref_id": 1, "ann_id": 100, "image_id": 9, "split": "train",
         "sentences": [{"sent_id": 7, "sent": "man on the left"}, {"sent_id": 8, "sent": "left guy"}]},
        {"ref_id": 2, "ann_id": 101, "image_id": 25, "split": "val", "sentences": [{"sent_id": 9, "sent": "bar"}]},
    ] + ([extra_ref] if extra_ref else [])
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return folder, images_dir


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def test_refcoco_records_and_masks(tmp_path):
    folder, images = _fake_refcoco(tmp_path)
    train = load_refer(str(folder / "refs(unc).p"), str(folder / "instances.json"), str(images), "train", "t")
    assert [r["sentence"] for r in train] == ["man on the left", "left guy"]
    assert train[0]["sample_id"] == "1_7" and train[0]["height"] == 20 and train[0]["width"] == 30
    mask = referent_mask(train[0])
    assert mask.shape == (20, 30) and mask[:10, :10].all() and not mask[:, 11:].any()
    (val,) = load_refer(str(folder / "refs(unc).p"), str(folder / "instances.json"), str(images), "val", "t")
    assert referent_mask(val).sum() == 32 and referent_mask(val)[4:8, 4:12].all()


def test_refs_pointing_outside_instances_json_are_refused(tmp_path):
    stray = {"ref_id": 3, "ann_id": 999, "image_id": 9, "split": "train", "sentences": [{"sent_id": 1, "sent": "x"}]}
    folder, images = _fake_refcoco(tmp_path, extra_ref=stray)
    with pytest.raises(DatasetError, match=r"1 referent\(s\) .* point at annotation or image ids .*ref_ids \[3\]"):
        load_refer(str(folder / "refs(unc).p"), str(folder / "instances.json"), str(images), "train", "t")
    with pytest.raises(DatasetError, match="no referent in split 'testA'"):
        load_refer(str(folder / "refs(unc).p"), str(folder / "instances.json"), str(images), "testA", "t")


def test_missing_and_corrupt_refer_files_name_the_file(tmp_path):
    folder, images = _fake_refcoco(tmp_path)
    with pytest.raises(DatasetError, match=r"refs\(google\)\.p.*does not exist.*datasets/README.md"):
        load_refer(str(folder / "refs(google).p"), str(folder / "instances.json"), str(images), "train", "t")
    (folder / "refs(unc).p").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a readable refs pickle"):
        load_refer(str(folder / "refs(unc).p"), str(folder / "instances.json"), str(images), "train", "t")


def test_standard_names_are_registered():
    for name in ("refcoco_unc_testA", "refcoco+_unc_testB", "refcocog_google_val", "refcocog_umd_test",
                 "referit_test", "synthetic_refer_val"):
        assert name in DatasetCatalog.list() and MetadataCatalog.get(name).evaluator_type == "refer"


def test_referit_records_and_mat_masks(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "referit"
    (root / "images").mkdir(parents=True)
    (root / "mask").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "images" / "1234.jpg")
    segimg = np.ones((10, 12), np.uint8)
    segimg[2:5, 3:6] = 0  # ReferIt marks the referent with 0
    savemat(root / "mask" / "1234_2.mat", {"segimg_t": segimg})
    (root / "referit_query_test.json").write_text(json.dumps({"1234_2": ["sky", "the sky on top"]}))
    records = load_referit(str(root), "test", "t")
    assert [r["sentence"] for r in records] == ["sky", "the sky on top"]
    mask = referent_mask(records[0])
    assert mask.sum() == 9 and mask[2:5, 3:6].all()


def test_colour_names_and_unique_descriptions():
    assert [colour_name(c) for c in ([230, 20, 20], [20, 200, 30], [30, 40, 220], [10, 10, 10], [240, 240, 240])] \
        == ["red", "green", "blue", "black", "white"]
    image = np.zeros((60, 60, 3), np.uint8)
    stuff = np.ones((60, 60), bool)
    left, right = np.zeros((60, 60), bool), np.zeros((60, 60), bool)
    left[25:35, 2:12], right[25:35, 48:58] = True, True
    image[left], image[right] = (220, 20, 20), (220, 20, 20)
    stuff &= ~(left | right)
    described = dict(describe_segments(image, [(12, stuff), (2, left), (2, right)]))
    assert described[0] == ["the blue stripes", "the water"]
    # Two red squares: only their positions tell them apart.
    assert described[1] == ["the square on the left", "the red square on the left"]
    assert described[2] == ["the square on the right", "the red square on the right"]


def test_synthetic_refer_set_is_deterministic_and_every_sentence_unique_per_image(refer_datasets_dir, tmp_path):
    import subprocess
    import sys

    from .conftest import REPO

    args = ["--root", str(tmp_path / "synthetic"), "--num-train", "16", "--num-val", "4", "--size", "64"]
    subprocess.run([sys.executable, str(REPO / "datasets" / "prepare_synthetic.py"), *args], check=True,
                   capture_output=True)
    for name in ("refs(synthetic).p", "instances.json", "vocabulary.txt"):
        assert (tmp_path / "synthetic" / "refer" / name).read_bytes() == \
            (refer_datasets_dir / "synthetic" / "refer" / name).read_bytes(), name
    refs = pickle.loads((tmp_path / "synthetic" / "refer" / "refs(synthetic).p").read_bytes())
    seen = {}
    for ref in refs:
        for sentence in ref["sentences"]:
            key = (ref["image_id"], sentence["sent"])
            assert key not in seen, key  # one sentence, one referent in its image
            seen[key] = ref["ref_id"]
    assert {ref["split"] for ref in refs} == {"train", "val"}


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_metrics_against_hand_computed_values():
    # Three sentences: I/U = 30/40 (0.75), 10/100 (0.1), 0/0 (both empty: 1).
    metrics = referring_metrics(np.array([30, 10, 0]), np.array([40, 100, 0]))
    assert metrics["oIoU"] == pytest.approx(100 * 40 / 140)
    assert metrics["mIoU"] == pytest.approx(100 * (0.75 + 0.1 + 1) / 3)
    assert metrics["Prec@0.5"] == pytest.approx(200 / 3) and metrics["Prec@0.7"] == pytest.approx(200 / 3)
    assert metrics["Prec@0.8"] == pytest.approx(100 / 3) and metrics["Prec@0.9"] == pytest.approx(100 / 3)


def test_evaluator_compares_at_the_original_resolution(tmp_path):
    folder, images = _fake_refcoco(tmp_path)
    name = "pytest_refcoco_train"
    register_refer(name, str(folder / "refs(unc).p"), str(folder / "instances.json"), str(images), "train")
    evaluator = ReferringEvaluator(name, distributed=False)
    evaluator.reset()
    prediction = torch.zeros(20, 30, dtype=torch.bool)
    prediction[:10, :5] = True  # half of the 10x10 target (polygon 0..10 covers 11x11 pixels when rasterised)
    target = referent_mask(DatasetCatalog.get(name)[0])
    evaluator.process([{"sample_id": "1_7"}, {"sample_id": "1_8"}],
                      [{"ref_mask": prediction}, {"ref_mask": torch.from_numpy(target)}])
    results = evaluator.evaluate()["refer"]
    first = (prediction.numpy() & target).sum() / (prediction.numpy() | target).sum()
    assert results["mIoU"] == pytest.approx(100 * (first + 1) / 2)
    assert results["oIoU"] == pytest.approx(100 * ((prediction.numpy() & target).sum() + target.sum())
                                            / ((prediction.numpy() | target).sum() + target.sum()))
    assert results["Prec@0.9"] == 50.0


def test_trivial_baselines_by_hand(tmp_path):
    folder, images = _fake_refcoco(tmp_path)
    name = "pytest_refcoco_val"
    register_refer(name, str(folder / "refs(unc).p"), str(folder / "instances.json"), str(images), "val")
    baselines = trivial_baselines(name)
    # One 16x16 image whose only segment (32 px) is the referent: all foreground has IoU 32/256,
    # the largest segment is the referent itself.
    assert baselines["all foreground"]["oIoU"] == pytest.approx(100 * 32 / 256)
    assert baselines["largest segment"]["oIoU"] == pytest.approx(100.0)
