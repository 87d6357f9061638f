"""The ADE20K / COCO registrations detectron2 lacks, and the datasets/prepare_*.py converters.

Tiny fake trees in the real layouts are written under tmp_path; the converters turn the raw
annotations into what the registrations read, and the registrations are re-pointed at them.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.structures import BoxMode
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

import kmax_m2f  # noqa: F401  (registers the datasets)
from kmax_m2f.data.datasets.checks import DatasetError, datasets_root
from kmax_m2f.data.datasets.register_ade20k_instance import (
    ADE20K_INSTANCE_CATEGORIES,
    register_all_ade20k_instance,
)
from kmax_m2f.data.datasets.register_ade20k_panoptic import (
    ADE20K_150_CATEGORIES,
    register_all_ade20k_panoptic,
)
from kmax_m2f.data.datasets.register_coco_stuff_10k import COCO_STUFF_CATEGORIES, register_all_coco_stuff_10k
from kmax_m2f.data.datasets.register_coco_panoptic_annos_semseg import (
    register_all_coco_panoptic_annos_sem_seg,
)

from .conftest import REPO, run_tool

ADE_PANOPTIC = ("ade20k_panoptic_train", "ade20k_panoptic_val")
ADE_INSTANCE = ("ade20k_instance_train", "ade20k_instance_val")
COCO_PANOPTIC = ("coco_2017_train_panoptic_with_sem_seg", "coco_2017_val_panoptic_with_sem_seg")


def _load_script(name: str):
    """A datasets/prepare_*.py script as a module (they are scripts, not package modules)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_ade20k_sem_seg = _load_script("prepare_ade20k_sem_seg")
prepare_ade20k_pan_seg = _load_script("prepare_ade20k_pan_seg")
prepare_ade20k_ins_seg = _load_script("prepare_ade20k_ins_seg")
prepare_coco_semantic = _load_script("prepare_coco_semantic_annos_from_panoptic")
prepare_coco_stuff_10k = _load_script("prepare_coco_stuff_10k")
COCO_STUFF_10K = ("coco_2017_train_stuff_10k_sem_seg", "coco_2017_test_stuff_10k_sem_seg")


def _forget(names) -> None:
    for name in names:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog:
            MetadataCatalog.remove(name)


@pytest.fixture
def register_at(monkeypatch):
    """``register_at(register_all, names, root)`` re-registers the official names under ``root``
    (as if $DETECTRON2_DATASETS had been ``root`` at import); the default root comes back after."""
    default_root = datasets_root()
    done = []

    def register(register_all, names, root) -> None:
        monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
        _forget(names)
        register_all(str(root))
        done.append((register_all, names))

    yield register
    for register_all, names in done:
        _forget(names)
        register_all(default_root)


# ---------------------------------------------------------------- fake ADE20K ---------------------
H, W = 12, 16
# instance-challenge classes (red channel) -> 150-class ids
BED, PERSON, CHAIR = 1, 4, 8
assert [ADE20K_INSTANCE_CATEGORIES[k - 1]["id"] for k in (BED, PERSON, CHAIR)] == [7, 12, 19]


def _ade20k_raw_labels(with_chair: bool) -> tuple[np.ndarray, np.ndarray]:
    """SceneParsing labels (1-based) and an instance PNG (red = class, green = instance id)."""
    semantic = np.ones((H, W), np.uint8)  # wall
    semantic[4:, :8] = 4  # floor
    semantic[4:, 8:] = 8  # bed: a thing class, used only where an instance says so
    semantic[0, 15] = semantic[11, 0] = 0  # void
    instance = np.zeros((H, W, 3), np.uint8)
    instance[5:11, 9:15] = (BED, 1, 0)
    instance[6:9, 2:5] = (PERSON, 2, 0)
    if with_chair:
        semantic[0:2, 0:2] = 3  # sky, which the chair below hides completely
        instance[0:2, 0:2] = (CHAIR, 3, 0)
    return semantic, instance


def _expected_categories(semantic: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """Per pixel, the 150-class id of the panoptic segment it should belong to (-1 = void)."""
    expected = np.full((H, W), -1)
    for label in np.unique(semantic):
        if label and not ADE20K_150_CATEGORIES[label - 1]["isthing"]:
            expected[semantic == label] = label - 1
    has_instance = instance[..., 1] > 0
    expected[has_instance] = [
        ADE20K_INSTANCE_CATEGORIES[k - 1]["id"] for k in instance[..., 0][has_instance]
    ]
    return expected


def _write_ade20k_raw(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ADEChallengeData2016 as downloaded (images, annotations, annotations_instance)."""
    ade = root / "ADEChallengeData2016"
    raw = {}
    rng = np.random.default_rng(0)
    for split, stems in (
        ("training", ["ADE_train_00000001", "ADE_train_00000002"]),
        ("validation", ["ADE_val_00000001"]),
    ):
        for sub in ("images", "annotations", "annotations_instance"):
            (ade / sub / split).mkdir(parents=True)
        for i, stem in enumerate(stems):
            semantic, instance = _ade20k_raw_labels(with_chair=i == 0)
            image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            Image.fromarray(image).save(ade / "images" / split / f"{stem}.jpg")
            Image.fromarray(semantic).save(ade / "annotations" / split / f"{stem}.png")
            Image.fromarray(instance).save(ade / "annotations_instance" / split / f"{stem}.png")
            raw[stem] = (semantic, instance)
    return raw


@pytest.fixture(scope="module")
def ade20k(tmp_path_factory):
    """(root, raw labels by stem) of a fake ADE20K tree on which all three converters have run."""
    root = tmp_path_factory.mktemp("ade20k_root")
    raw = _write_ade20k_raw(root)
    ade = str(root / "ADEChallengeData2016")
    prepare_ade20k_sem_seg.convert_ade20k_sem_seg(ade)
    for split in ("train", "val"):
        prepare_ade20k_pan_seg.convert_ade20k_panoptic(ade, split)
        prepare_ade20k_ins_seg.convert_ade20k_instance(ade, split)
    return root, raw


# ---------------------------------------------------------------- fake COCO -----------------------
COCO_STEMS = ("000000000139", "000000000285")
PERSON_ID, DOG_ID, RUG_ID = 1, 18, 200  # COCO category ids; contiguous 0, 16, 132


def _coco_panoptic(index: int) -> tuple[np.ndarray, list[dict]]:
    ids = np.full((10, 12), 5000000 + index)  # rug everywhere ...
    ids[0, :3] = 0  # ... but for some void
    segments = [{"id": 5000000 + index, "category_id": RUG_ID, "iscrowd": 0}]
    if index == 0:
        ids[2:6, 1:4] = 3
        ids[5:9, 6:11] = 70000
        segments += [
            {"id": 3, "category_id": PERSON_ID, "iscrowd": 0},
            {"id": 70000, "category_id": DOG_ID, "iscrowd": 1},
        ]
    for segment in segments:
        segment["area"] = int((ids == segment["id"]).sum())
    return ids, segments


def _write_coco(root: Path, split: str = "val2017") -> Path:
    """coco/{val2017, panoptic_val2017, annotations/panoptic_val2017.json}."""
    coco = root / "coco"
    for sub in (split, f"panoptic_{split}", "annotations"):
        (coco / sub).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, stem in enumerate(COCO_STEMS):
        ids, segments = _coco_panoptic(index)
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(coco / split / f"{stem}.jpg")
        Image.fromarray(id2rgb(ids)).save(coco / f"panoptic_{split}" / f"{stem}.png")
        images.append({"id": int(stem), "file_name": f"{stem}.jpg", "height": 10, "width": 12})
        annotations.append(
            {"image_id": int(stem), "file_name": f"{stem}.png", "segments_info": segments}
        )
    panoptic_json = coco / "annotations" / f"panoptic_{split}.json"
    panoptic_json.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": COCO_CATEGORIES})
    )
    return panoptic_json


def _convert_coco(root: Path, split: str = "val2017", workers: int = 1) -> int:
    coco = root / "coco"
    return prepare_coco_semantic.convert_coco_panoptic_to_semantic(
        str(coco / "annotations" / f"panoptic_{split}.json"),
        str(coco / f"panoptic_{split}"),
        str(coco / f"panoptic_semseg_{split}"),
        workers=workers,
    )


# ---------------------------------------------------------------- tests ---------------------------
def test_official_names_are_registered():
    for name in ADE_PANOPTIC:
        assert MetadataCatalog.get(name).evaluator_type == "ade20k_panoptic_seg"
    for name in ADE_INSTANCE:
        assert MetadataCatalog.get(name).evaluator_type == "coco"
    for name in COCO_PANOPTIC:
        assert MetadataCatalog.get(name).evaluator_type == "coco_panoptic_seg"
    for name in ADE_PANOPTIC + ADE_INSTANCE + COCO_PANOPTIC:
        assert name in DatasetCatalog.list()
    # detectron2's ADE20K semantic datasets get the colours of the panoptic classes.
    assert MetadataCatalog.get("ade20k_sem_seg_val").stuff_colors[2] == [6, 230, 230]


def test_ade20k_category_tables():
    assert [c["id"] for c in ADE20K_150_CATEGORIES] == list(range(150))
    things = [c["id"] for c in ADE20K_150_CATEGORIES if c["isthing"]]
    assert things == sorted(c["id"] for c in ADE20K_INSTANCE_CATEGORIES) and len(things) == 100
    assert ADE20K_150_CATEGORIES[8]["name"] == "window " and ADE20K_150_CATEGORIES[8]["isthing"]
    # Stuff segment ids are category colours, so the converter's stuff colours must be distinct.
    stuff_colors = [
        tuple(c["color"]) for c in prepare_ade20k_pan_seg.panoptic_categories() if not c["isthing"]
    ]
    assert len(set(stuff_colors)) == len(stuff_colors) == 50


def test_prepare_ade20k_sem_seg(ade20k):
    root, raw = ade20k
    out = root / "ADEChallengeData2016" / "annotations_detectron2"
    for stem, (semantic, _) in raw.items():
        split = "training" if "train" in stem else "validation"
        label = np.asarray(Image.open(out / split / f"{stem}.png"))
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label[semantic > 0], semantic[semantic > 0] - 1)
        assert (label[semantic == 0] == 255).all()


def test_prepare_ade20k_pan_seg(ade20k):
    root, raw = ade20k
    ade = root / "ADEChallengeData2016"
    panoptic_json = json.loads((ade / "ade20k_panoptic_train.json").read_text())
    assert len(panoptic_json["categories"]) == 150
    assert panoptic_json["images"][0] == {
        "id": "ADE_train_00000001",
        "file_name": "ADE_train_00000001.jpg",
        "width": W,
        "height": H,
    }
    for annotation in panoptic_json["annotations"]:
        semantic, instance = raw[annotation["image_id"]]
        expected = _expected_categories(semantic, instance)
        ids = rgb2id(
            np.asarray(Image.open(ade / "ade20k_panoptic_train" / annotation["file_name"]))
        )
        segments = annotation["segments_info"]
        assert len({s["id"] for s in segments}) == len(segments)
        assert set(np.unique(ids)) - {0} == {s["id"] for s in segments}
        np.testing.assert_array_equal(ids == 0, expected == -1)
        for segment in segments:
            mask = ids == segment["id"]
            assert (expected[mask] == segment["category_id"]).all()
            assert segment["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert segment["bbox"] == [xs.min(), ys.min(), xs.ptp() + 1, ys.ptp() + 1]
        # every instance is a segment of its own; wall and floor are the only stuff left (the
        # chair covers the sky completely, so no empty sky segment is listed)
        thing_segments = [s for s in segments if ADE20K_150_CATEGORIES[s["category_id"]]["isthing"]]
        assert len(thing_segments) == len(np.unique(instance[..., 1])) - 1
        assert sorted(s["category_id"] for s in segments if s not in thing_segments) == [0, 3]


def test_prepare_ade20k_ins_seg(ade20k):
    root, raw = ade20k
    data = json.loads((root / "ADEChallengeData2016" / "ade20k_instance_train.json").read_text())
    assert data["categories"][:2] == [{"id": 7, "name": "bed"}, {"id": 8, "name": "windowpane"}]
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert len(data["annotations"]) == 3 + 2
    for annotation in data["annotations"]:
        _, instance = raw[annotation["image_id"]]
        mask = mask_util.decode(annotation["segmentation"]).astype(bool)
        instance_class = np.unique(instance[..., 0][mask])
        assert (instance[..., 1][mask] > 0).all() and len(instance_class) == 1
        np.testing.assert_array_equal(mask, instance[..., 1] == instance[..., 1][mask][0])
        assert annotation["category_id"] == ADE20K_INSTANCE_CATEGORIES[instance_class[0] - 1]["id"]
        assert annotation["area"] == mask.sum() and annotation["iscrowd"] == 0
        ys, xs = np.nonzero(mask)
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.ptp() + 1, ys.ptp() + 1]


def test_ade20k_panoptic_catalog(ade20k, register_at):
    root, _ = ade20k
    register_at(register_all_ade20k_panoptic, ADE_PANOPTIC, root)
    ade = root / "ADEChallengeData2016"
    records = DatasetCatalog.get("ade20k_panoptic_train")
    assert [r["image_id"] for r in records] == ["ADE_train_00000001", "ADE_train_00000002"]
    record = records[0]
    assert record["file_name"] == str(ade / "images/training/ADE_train_00000001.jpg")
    assert record["pan_seg_file_name"] == str(ade / "ade20k_panoptic_train/ADE_train_00000001.png")
    assert record["sem_seg_file_name"] == str(
        ade / "annotations_detectron2/training/ADE_train_00000001.png"
    )
    by_category = {s["category_id"]: s for s in record["segments_info"]}
    assert set(by_category) == {0, 3, 7, 12, 19}  # wall, floor, bed, person, chair
    assert by_category[7]["isthing"] and not by_category[0]["isthing"]

    meta = MetadataCatalog.get("ade20k_panoptic_train")
    assert meta.evaluator_type == "ade20k_panoptic_seg"
    assert (meta.ignore_label, meta.label_divisor) == (255, 1000)
    assert (
        len(meta.thing_classes) == 100 and len(meta.stuff_classes) == len(meta.stuff_colors) == 150
    )
    assert meta.thing_dataset_id_to_contiguous_id[7] == 7
    assert len(meta.stuff_dataset_id_to_contiguous_id) == 150
    assert meta.panoptic_root == str(ade / "ade20k_panoptic_train")
    assert meta.panoptic_json == str(ade / "ade20k_panoptic_train.json")
    assert meta.json_file == str(ade / "ade20k_instance_train.json")
    assert meta.image_root == str(ade / "images/training")


def test_ade20k_instance_catalog(ade20k, register_at):
    root, _ = ade20k
    register_at(register_all_ade20k_instance, ADE_INSTANCE, root)
    records = DatasetCatalog.get("ade20k_instance_val")
    assert len(records) == 1 and records[0]["image_id"] == "ADE_val_00000001"
    assert records[0]["file_name"] == str(
        root / "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"
    )
    annotations = records[0]["annotations"]
    assert sorted(a["category_id"] for a in annotations) == [0, 3, 7]  # bed, person, chair
    assert all(
        a["bbox_mode"] == BoxMode.XYWH_ABS and "counts" in a["segmentation"] for a in annotations
    )
    meta = MetadataCatalog.get("ade20k_instance_val")
    assert meta.evaluator_type == "coco" and meta.thing_classes[3] == "person"
    assert meta.thing_dataset_id_to_contiguous_id[12] == 3


def test_prepare_coco_semantic(tmp_path):
    _write_coco(tmp_path)
    assert _convert_coco(tmp_path) == 2
    for index, stem in enumerate(COCO_STEMS):
        ids, _ = _coco_panoptic(index)
        label = np.asarray(Image.open(tmp_path / "coco/panoptic_semseg_val2017" / f"{stem}.png"))
        assert label.dtype == np.uint8 and label.shape == ids.shape
        assert (label[ids == 0] == 255).all()
        assert (label[ids >= 5000000] == 132).all()  # rug-merged, the last of 133 classes
        if index == 0:
            assert (label[ids == 3] == 0).all()  # person
            assert (label[ids == 70000] == 16).all()  # dog (crowd regions keep their class)


def test_coco_panoptic_with_sem_seg_catalog(tmp_path, register_at):
    _write_coco(tmp_path)
    _convert_coco(tmp_path)
    register_at(register_all_coco_panoptic_annos_sem_seg, COCO_PANOPTIC, tmp_path)
    records = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    coco = tmp_path / "coco"
    assert records[0] == {
        "file_name": str(coco / "val2017/000000000139.jpg"),
        "image_id": 139,
        "pan_seg_file_name": str(coco / "panoptic_val2017/000000000139.png"),
        "sem_seg_file_name": str(coco / "panoptic_semseg_val2017/000000000139.png"),
        "segments_info": [
            {"id": 5000000, "category_id": 132, "iscrowd": 0, "area": 85, "isthing": False},
            {"id": 3, "category_id": 0, "iscrowd": 0, "area": 12, "isthing": True},
            {"id": 70000, "category_id": 16, "iscrowd": 1, "area": 20, "isthing": True},
        ],
    }
    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert (meta.ignore_label, meta.label_divisor) == (255, 1000)
    assert len(meta.thing_classes) == 80 and len(meta.stuff_classes) == 133
    assert meta.thing_dataset_id_to_contiguous_id[DOG_ID] == 16
    assert meta.stuff_dataset_id_to_contiguous_id[RUG_ID] == 132
    assert len(meta.stuff_dataset_id_to_contiguous_id) == 133
    assert meta.sem_seg_root == str(coco / "panoptic_semseg_val2017")
    assert meta.json_file == str(coco / "annotations/instances_val2017.json")
    assert meta.image_root == str(coco / "val2017")


def _write_coco_stuff_10k(root: Path, labels: dict) -> Path:
    """The layout of cocostuff-10k-v1.1.zip: ``labels`` maps split -> {stem: [H, W] label map 'S'}."""
    import scipy.io

    base = root / "coco" / "coco_stuff_10k"
    for folder in ("images", "annotations", "imageLists"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for split, per_image in labels.items():
        (base / "imageLists" / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in per_image))
        for stem, label in per_image.items():
            Image.fromarray(np.zeros((*label.shape, 3), np.uint8)).save(base / "images" / f"{stem}.jpg")
            scipy.io.savemat(base / "annotations" / f"{stem}.mat", {"S": label})
    return base


def test_coco_stuff_10k_categories():
    assert len(COCO_STUFF_CATEGORIES) == 171
    ids = [c["id"] for c in COCO_STUFF_CATEGORIES]
    assert ids == sorted(ids) and ids[0] == 1 and ids[79] == 90 and ids[80] == 92 and ids[-1] == 182
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91} & set(ids)  # COCO's unused ids
    names = [c["name"] for c in COCO_STUFF_CATEGORIES]
    assert (names[0], names[79], names[80], names[-1]) == ("person", "toothbrush", "banner", "wood")
    assert names.index("sky-other") == 80 + (157 - 92)


def test_prepare_coco_stuff_10k_and_catalog(tmp_path, register_at):
    person, sky, wood = 1, 157, 182
    train_label = np.array([[0, person], [sky, wood]], np.uint8)
    base = _write_coco_stuff_10k(tmp_path, {"train": {"COCO_train2014_000000000077": train_label},
                                            "test": {"COCO_train2014_000000000139": np.full((2, 2), sky, np.uint8)}})
    prepare_coco_stuff_10k.convert_coco_stuff_10k(str(base))
    png = np.asarray(Image.open(base / "annotations_detectron2/train/COCO_train2014_000000000077.png"))
    names = [c["name"] for c in COCO_STUFF_CATEGORIES]
    assert png.tolist() == [[255, names.index("person")], [names.index("sky-other"), 170]]

    register_at(register_all_coco_stuff_10k, COCO_STUFF_10K, tmp_path)
    records = DatasetCatalog.get("coco_2017_train_stuff_10k_sem_seg")
    assert [Path(r["file_name"]).name for r in records] == ["COCO_train2014_000000000077.jpg"]
    assert Path(records[0]["sem_seg_file_name"]).parent == base / "annotations_detectron2" / "train"
    meta = MetadataCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255 and len(meta.stuff_classes) == 171
    assert meta.stuff_dataset_id_to_contiguous_id[wood] == 170


def test_coco_stuff_10k_bad_input(tmp_path, register_at):
    register_at(register_all_coco_stuff_10k, COCO_STUFF_10K, tmp_path)
    with pytest.raises(DatasetError, match="prepare_coco_stuff_10k.py"):
        DatasetCatalog.get("coco_2017_train_stuff_10k_sem_seg")
    with pytest.raises(DatasetError, match="cocostuff-10k-v1.1.zip"):
        prepare_coco_stuff_10k.convert_coco_stuff_10k(str(tmp_path / "coco" / "coco_stuff_10k"))
    base = _write_coco_stuff_10k(tmp_path, {"train": {"a": np.array([[12, 1]], np.uint8)}})  # 12: unused by COCO
    with pytest.raises(DatasetError, match=r"a\.mat: label values \[12\] are not COCO-Stuff class ids"):
        prepare_coco_stuff_10k.convert_coco_stuff_10k(str(base), ("train",))
    (base / "annotations" / "a.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="a.mat: cannot read it as a MATLAB file"):
        prepare_coco_stuff_10k.convert_coco_stuff_10k(str(base), ("train",))


# ---------------------------------------------------------------- bad input -----------------------
@pytest.mark.parametrize(
    "register_all, names",
    [
        (register_all_ade20k_panoptic, ADE_PANOPTIC),
        (register_all_ade20k_instance, ADE_INSTANCE),
        (register_all_coco_panoptic_annos_sem_seg, COCO_PANOPTIC),
    ],
)
def test_missing_root(tmp_path, register_at, register_all, names):
    missing = tmp_path / "no_such_root"
    register_at(register_all, names, missing)  # registering reads nothing ...
    with pytest.raises(DatasetError, match="DETECTRON2_DATASETS") as e:
        DatasetCatalog.get(names[1])  # ... using the dataset does
    assert str(missing) in str(e.value) and "README" in str(e.value)


def test_corrupt_json(ade20k, tmp_path, register_at):
    root = tmp_path / "copy"
    shutil.copytree(ade20k[0], root)
    ade = root / "ADEChallengeData2016"
    for json_file in ("ade20k_panoptic_val.json", "ade20k_instance_val.json"):
        (ade / json_file).write_text('{"annotations": [')
    register_at(register_all_ade20k_panoptic, ADE_PANOPTIC, root)
    register_at(register_all_ade20k_instance, ADE_INSTANCE, root)
    for name, json_file in (
        ("ade20k_panoptic_val", "ade20k_panoptic_val.json"),
        ("ade20k_instance_val", "ade20k_instance_val.json"),
    ):
        with pytest.raises(DatasetError, match="not valid JSON") as e:
            DatasetCatalog.get(name)
        assert str(ade / json_file) in str(e.value)


def test_missing_semantic_files_name_the_script(ade20k, tmp_path, register_at):
    root = tmp_path / "copy"
    shutil.copytree(ade20k[0], root)
    (root / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png").unlink()
    register_at(register_all_ade20k_panoptic, ADE_PANOPTIC, root)
    with pytest.raises(DatasetError, match="ADE_val_00000001.png.*prepare_ade20k_sem_seg.py"):
        DatasetCatalog.get("ade20k_panoptic_val")


def test_unknown_category_in_panoptic_json(tmp_path, register_at):
    panoptic_json = _write_coco(tmp_path)
    _convert_coco(tmp_path)
    data = json.loads(panoptic_json.read_text())
    data["annotations"][1]["segments_info"][0]["category_id"] = 12345
    panoptic_json.write_text(json.dumps(data))
    register_at(register_all_coco_panoptic_annos_sem_seg, COCO_PANOPTIC, tmp_path)
    with pytest.raises(DatasetError, match="category_id 12345"):
        DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")


def test_panoptic_png_with_ids_missing_from_json(tmp_path):
    panoptic_json = _write_coco(tmp_path)
    data = json.loads(panoptic_json.read_text())
    del data["annotations"][0]["segments_info"][1]  # the person, id 3, is still in the PNG
    panoptic_json.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"000000000139\.png: segment ids \[3\]"):
        _convert_coco(tmp_path)


def test_converters_report_bad_input(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    with pytest.raises(DatasetError, match="annotations.*DETECTRON2_DATASETS"):
        prepare_ade20k_sem_seg.convert_ade20k_sem_seg(str(ade))
    _write_ade20k_raw(tmp_path)
    shutil.rmtree(ade / "annotations_instance")
    for convert in (
        prepare_ade20k_pan_seg.convert_ade20k_panoptic,
        prepare_ade20k_ins_seg.convert_ade20k_instance,
    ):
        with pytest.raises(DatasetError, match="annotations_instance.tar"):
            convert(str(ade), "val")
    # an instance whose pixels disagree about its class
    instance = np.zeros((H, W, 3), np.uint8)
    instance[:2, :2] = (BED, 1, 0)
    instance[0, 0, 0] = PERSON
    with pytest.raises(DatasetError, match="instance 1 has class value"):
        prepare_ade20k_ins_seg.ade20k_to_instances(instance, "x", 1, "x.png")
    with pytest.raises(DatasetError, match="out of ADE20K's range"):
        prepare_ade20k_sem_seg.to_detectron2_labels(np.full((2, 2), 151, np.uint8), "y.png")


def test_scripts_run_from_the_command_line(tmp_path):
    _write_coco(tmp_path)
    script = "datasets/prepare_coco_semantic_annos_from_panoptic.py"
    run_tool([script, "--splits", "val2017", "--workers", "2"], tmp_path, cwd=REPO)
    assert len(list((tmp_path / "coco/panoptic_semseg_val2017").glob("*.png"))) == 2
    # a missing input is one line naming the folder, not a traceback
    result = run_tool([script, "--splits", "train2017"], tmp_path, cwd=REPO, check=False)
    assert result.returncode == 1
    assert "error: " in result.stderr and "Traceback" not in result.stderr
    assert "panoptic_train2017" in result.stderr
