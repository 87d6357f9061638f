"""Mask2Former's training mappers on the synthetic set: outputs, augmentation, bad input."""

import copy
import pickle
import re

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.utils.env import seed_all_rng
from panopticapi.utils import id2rgb
from PIL import Image

import kmax_m2f
from kmax_m2f.data import MAPPER_REGISTRY, build_mapper
from kmax_m2f.data.datasets.checks import DatasetError
from kmax_m2f.data.mappers.coco_lsj import (
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
)
from kmax_m2f.data.mappers.mask_former_instance import MaskFormerInstanceDatasetMapper
from kmax_m2f.data.mappers.mask_former_panoptic import MaskFormerPanopticDatasetMapper
from kmax_m2f.data.mappers.mask_former_semantic import MaskFormerSemanticDatasetMapper
from kmax_m2f.data.panoptic import read_panoptic_ids
from kmax_m2f.data.synthetic_generator import IGNORE_LABEL

NUM_CLASSES = 8  # all synthetic categories (5 things + 3 stuff)
NUM_THINGS = 5
SIZE = 64  # synthetic image size (tests/conftest.py)
MAPPER_DATASETS = {
    "mask_former_semantic": "sem_seg",
    "mask_former_panoptic": "panoptic",
    "mask_former_instance": "instance",
    "coco_instance_lsj": "instance",
    "coco_panoptic_lsj": "panoptic",
}
MAPPER_CLASSES = {
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
}


@pytest.fixture(scope="module")
def base_cfg():
    """Geometry-preserving settings: resize 64 -> 64, no flip, no crop, no padding."""
    cfg = kmax_m2f.build_config()
    cfg.defrost()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = SIZE
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    cfg.INPUT.IMAGE_SIZE = 96
    return cfg


def make_cfg(base_cfg, mapper_name: str, **input_keys):
    cfg = base_cfg.clone()
    cfg.INPUT.DATASET_MAPPER_NAME = mapper_name
    for key, value in input_keys.items():
        node = cfg.INPUT
        *parents, leaf = key.split("__")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


def records(prefix: str, kind: str) -> list[dict]:
    return DatasetCatalog.get(f"{prefix}_{kind}_train")


def check_common_outputs(out: dict, height: int, width: int) -> None:
    """Keys, dtypes and shapes every mapper must produce."""
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, height, width)
    instances = out["instances"]
    assert instances.image_size == (height, width)
    n = len(instances)
    assert instances.gt_classes.dtype == torch.int64 and instances.gt_classes.shape == (n,)
    assert instances.gt_masks.dtype == torch.bool and instances.gt_masks.shape == (n, height, width)
    assert ((instances.gt_classes >= 0) & (instances.gt_classes < NUM_CLASSES)).all()
    if "sem_seg" in out:
        assert out["sem_seg"].dtype == torch.int64 and out["sem_seg"].shape == (height, width)


def test_every_official_mapper_name_is_registered(base_cfg, synthetic_prefix):
    for name, cls in MAPPER_CLASSES.items():
        assert name in MAPPER_REGISTRY
        mapper = build_mapper(make_cfg(base_cfg, name, COLOR_AUG_SSD=True))
        assert type(mapper) is cls
        pickle.dumps(mapper)  # data-loader workers receive the mapper pickled
    with pytest.raises(ValueError, match="training"):
        build_mapper(make_cfg(base_cfg, "mask_former_semantic"), is_train=False)


def test_semantic_masks_are_the_classes_of_sem_seg(base_cfg, synthetic_prefix):
    mapper = build_mapper(make_cfg(base_cfg, "mask_former_semantic"))
    for record in records(synthetic_prefix, "sem_seg")[:4]:
        out = mapper(record)
        check_common_outputs(out, SIZE, SIZE)
        sem_seg, instances = out["sem_seg"], out["instances"]
        expected = np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64)
        assert (sem_seg.numpy() == expected).all()
        present = torch.unique(sem_seg)
        assert instances.gt_classes.tolist() == present[present != IGNORE_LABEL].tolist()
        for cls, mask in zip(instances.gt_classes, instances.gt_masks):
            assert (mask == (sem_seg == cls)).all()
        assert "sem_seg_file_name" not in out and "sem_seg_file_name" in record


def test_semantic_crop_and_padding(base_cfg, synthetic_prefix):
    cfg = make_cfg(
        base_cfg,
        "mask_former_semantic",
        MIN_SIZE_TRAIN=(80,),
        MAX_SIZE_TRAIN=200,
        SIZE_DIVISIBILITY=32,
        CROP__ENABLED=True,
        CROP__TYPE="absolute",
        CROP__SIZE=(56, 40),
        CROP__SINGLE_CATEGORY_MAX_AREA=0.9,
    )
    mapper = build_mapper(cfg)
    np.random.seed(0)
    for record in records(synthetic_prefix, "sem_seg")[:4]:
        out = mapper(record)
        check_common_outputs(out, 64, 64)  # the 56 x 40 crop padded up to multiples of 32
        image, sem_seg, masks = out["image"], out["sem_seg"], out["instances"].gt_masks
        assert (image[:, 56:] == 128).all() and (image[:, :, 40:] == 128).all()
        assert (sem_seg[56:] == IGNORE_LABEL).all() and (sem_seg[:, 40:] == IGNORE_LABEL).all()
        assert not masks[:, 56:].any() and not masks[:, :, 40:].any()
        assert (sem_seg[:56, :40] != IGNORE_LABEL).all()
        for cls, mask in zip(out["instances"].gt_classes, masks):
            assert (mask == (sem_seg == cls)).all()


def test_panoptic_masks_are_the_segments(base_cfg, synthetic_prefix):
    mapper = build_mapper(make_cfg(base_cfg, "mask_former_panoptic"))
    for record in records(synthetic_prefix, "panoptic")[:4]:
        out = mapper(record)
        check_common_outputs(out, SIZE, SIZE)
        instances = out["instances"]
        ids = read_panoptic_ids(record["pan_seg_file_name"], record["segments_info"])
        assert instances.gt_classes.tolist() == [s["category_id"] for s in record["segments_info"]]
        for segment, mask in zip(record["segments_info"], instances.gt_masks):
            assert (mask.numpy() == (ids == segment["id"])).all()
        # One segment per pixel, and the same class as the semantic labels.
        assert instances.gt_masks.sum(0).max() <= 1
        labels = torch.full((SIZE, SIZE), IGNORE_LABEL, dtype=torch.int64)
        for cls, mask in zip(instances.gt_classes, instances.gt_masks):
            labels[mask] = cls
        assert (labels == out["sem_seg"]).all()


def test_panoptic_drops_crowd_segments_and_works_without_sem_seg(base_cfg, synthetic_prefix):
    record = copy.deepcopy(records(synthetic_prefix, "panoptic")[0])
    record["segments_info"][0]["iscrowd"] = 1
    del record["sem_seg_file_name"]
    out = build_mapper(make_cfg(base_cfg, "mask_former_panoptic"))(record)
    assert "sem_seg" not in out
    assert out["instances"].gt_classes.tolist() == [s["category_id"] for s in record["segments_info"][1:]]

    # Without semantic labels, a class-area-constrained crop has nothing to measure.
    cfg = make_cfg(
        base_cfg,
        "mask_former_panoptic",
        CROP__ENABLED=True,
        CROP__TYPE="absolute",
        CROP__SIZE=(32, 32),
        CROP__SINGLE_CATEGORY_MAX_AREA=0.5,
    )
    with pytest.raises(DatasetError, match="SINGLE_CATEGORY_MAX_AREA.*sem_seg_file_name"):
        build_mapper(cfg)(record)


def test_instance_masks_are_the_annotations(base_cfg, synthetic_prefix):
    mapper = build_mapper(make_cfg(base_cfg, "mask_former_instance"))
    for record in records(synthetic_prefix, "instance")[:4]:
        out = mapper(record)
        check_common_outputs(out, SIZE, SIZE)
        instances = out["instances"]
        assert instances.gt_classes.tolist() == [a["category_id"] for a in record["annotations"]]
        assert (instances.gt_classes < NUM_THINGS).all()
        for annotation, mask in zip(record["annotations"], instances.gt_masks):
            assert (mask.numpy() == mask_util.decode(annotation["segmentation"]).astype(bool)).all()


def test_instance_polygons_and_crowd(base_cfg, synthetic_prefix):
    record = copy.deepcopy(records(synthetic_prefix, "instance")[0])
    square = {
        "category_id": 2,
        "iscrowd": 0,
        "bbox": [8, 4, 16, 16],
        "bbox_mode": record["annotations"][0]["bbox_mode"],
        "segmentation": [[8, 4, 24, 4, 24, 20, 8, 20]],
    }
    crowd = dict(record["annotations"][0], iscrowd=1)
    record["annotations"] = [crowd, square]
    out = build_mapper(make_cfg(base_cfg, "mask_former_instance"))(record)
    instances = out["instances"]
    assert instances.gt_classes.tolist() == [2]
    ys, xs = torch.nonzero(instances.gt_masks[0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 19, 8, 23)


@pytest.mark.parametrize("name", ["mask_former_semantic", "mask_former_panoptic", "mask_former_instance"])
def test_flip_mirrors_image_and_labels(base_cfg, synthetic_prefix, name):
    record = records(synthetic_prefix, MAPPER_DATASETS[name])[0]
    plain = build_mapper(make_cfg(base_cfg, name))(record)
    # The same mapper from plain arguments, with a flip that always happens.
    cls = MAPPER_CLASSES[name]
    args = cls.from_config(make_cfg(base_cfg, name))
    args["augmentations"] = [T.RandomFlip(prob=1.0)]
    flipped = cls(**args)(record)
    assert (flipped["image"] == plain["image"].flip(-1)).all()
    assert (flipped["instances"].gt_masks == plain["instances"].gt_masks.flip(-1)).all()
    assert (flipped["instances"].gt_classes == plain["instances"].gt_classes).all()
    if "sem_seg" in plain:
        assert (flipped["sem_seg"] == plain["sem_seg"].flip(-1)).all()


def test_random_augmentation_is_reproducible_with_a_seed(base_cfg, synthetic_prefix):
    cfg = make_cfg(
        base_cfg,
        "mask_former_panoptic",
        MIN_SIZE_TRAIN=(48, 64, 96),
        MIN_SIZE_TRAIN_SAMPLING="choice",
        RANDOM_FLIP="horizontal",
        CROP__ENABLED=True,
        CROP__TYPE="absolute",
        CROP__SIZE=(40, 40),
        COLOR_AUG_SSD=True,
    )
    mapper = build_mapper(cfg)
    record = records(synthetic_prefix, "panoptic")[1]
    outputs = []
    for _ in range(2):
        seed_all_rng(3)  # numpy drives flip and crop, Python's random the SSD colour jitter
        outputs.append(mapper(record))
    first, second = outputs
    assert (first["image"] == second["image"]).all() and (first["sem_seg"] == second["sem_seg"]).all()
    assert (first["instances"].gt_masks == second["instances"].gt_masks).all()
    assert first["image"].shape == (3, 40, 40)


@pytest.mark.parametrize("name", ["coco_instance_lsj", "coco_panoptic_lsj"])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_lsj_output_is_an_image_size_square(base_cfg, synthetic_prefix, name, scale):
    size = base_cfg.INPUT.IMAGE_SIZE
    mapper = build_mapper(
        make_cfg(base_cfg, name, MIN_SCALE=scale, MAX_SCALE=scale, RANDOM_FLIP="horizontal")
    )
    np.random.seed(0)
    for record in records(synthetic_prefix, MAPPER_DATASETS[name])[:3]:
        out = mapper(record)
        check_common_outputs(out, size, size)
        instances, padding = out["instances"], out["padding_mask"]
        assert padding.dtype == torch.bool and padding.shape == (size, size)
        # 0.5: the 64 px image becomes 48 px on the 96 px canvas; 2.0: 192 px cropped to 96.
        visible = int(SIZE * scale * size / SIZE) if scale < 1 else size
        assert padding.sum() == size * size - visible * visible
        assert (out["image"][:, padding] == 128).all()
        assert not instances.gt_masks[:, padding].any()
        assert instances.gt_boxes.tensor.shape == (len(instances), 4)
        for box, mask in zip(instances.gt_boxes.tensor, instances.gt_masks):
            if mask.any():
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        if name == "coco_instance_lsj":  # instances the crop removed are dropped
            assert instances.gt_masks.flatten(1).any(1).all()
        else:  # every non-crowd segment keeps its target, as in the official mapper
            assert instances.gt_classes.tolist() == [s["category_id"] for s in record["segments_info"]]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,suffix", [("L", ".jpg"), ("RGBA", ".png"), ("P", ".png")])
@pytest.mark.parametrize("name", ["mask_former_semantic", "coco_panoptic_lsj"])
def test_grey_rgba_and_palette_images_become_three_channels(
    base_cfg, synthetic_prefix, tmp_path, mode, suffix, name
):
    record = dict(records(synthetic_prefix, MAPPER_DATASETS[name])[0])
    path = tmp_path / f"image_{mode}{suffix}"
    Image.open(record["file_name"]).convert(mode).save(path)
    record["file_name"] = str(path)
    out = build_mapper(make_cfg(base_cfg, name))(record)
    size = SIZE if name == "mask_former_semantic" else base_cfg.INPUT.IMAGE_SIZE
    check_common_outputs(out, size, size)
    if mode == "L":
        assert (out["image"][0] == out["image"][1]).all() and (out["image"][1] == out["image"][2]).all()


def test_image_and_label_size_mismatch_names_the_files(base_cfg, synthetic_prefix, tmp_path):
    record = dict(records(synthetic_prefix, "instance")[0], width=SIZE + 1)
    with pytest.raises(SizeMismatchError, match=record["file_name"]):
        build_mapper(make_cfg(base_cfg, "mask_former_instance"))(record)

    record = dict(records(synthetic_prefix, "sem_seg")[0])
    small = tmp_path / "small_label.png"
    Image.open(record["sem_seg_file_name"]).resize((SIZE // 2, SIZE // 2), Image.NEAREST).save(small)
    record["sem_seg_file_name"] = str(small)
    with pytest.raises(DatasetError, match=rf"small_label\.png is 32x32.*{record['file_name']} is 64x64"):
        build_mapper(make_cfg(base_cfg, "mask_former_semantic"))(record)

    record = dict(records(synthetic_prefix, "panoptic")[0])
    small = tmp_path / "small_panoptic.png"
    Image.open(record["pan_seg_file_name"]).resize((SIZE, SIZE // 2), Image.NEAREST).save(small)
    record["pan_seg_file_name"] = str(small)
    with pytest.raises(DatasetError, match=r"small_panoptic\.png is 64x32"):
        build_mapper(make_cfg(base_cfg, "mask_former_panoptic"))(record)


def test_colour_label_png_is_rejected(base_cfg, synthetic_prefix, tmp_path):
    record = dict(records(synthetic_prefix, "sem_seg")[0])
    colour = tmp_path / "colour_label.png"
    Image.open(record["sem_seg_file_name"]).convert("RGB").save(colour)
    record["sem_seg_file_name"] = str(colour)
    with pytest.raises(DatasetError, match=r"colour_label\.png has 3 channels"):
        build_mapper(make_cfg(base_cfg, "mask_former_semantic"))(record)


@pytest.fixture(scope="module")
def empty_records(synthetic_prefix, tmp_path_factory) -> dict[str, dict]:
    """One record per annotation kind whose image has no segment at all."""
    folder = tmp_path_factory.mktemp("empty")
    void = np.zeros((SIZE, SIZE), np.int64)
    Image.fromarray(id2rgb(void)).save(folder / "panoptic.png")
    Image.fromarray(np.full((SIZE, SIZE), IGNORE_LABEL, np.uint8)).save(folder / "semantic.png")
    panoptic = dict(records(synthetic_prefix, "panoptic")[0], segments_info=[])
    panoptic["pan_seg_file_name"] = str(folder / "panoptic.png")
    panoptic["sem_seg_file_name"] = str(folder / "semantic.png")
    sem_seg = dict(records(synthetic_prefix, "sem_seg")[0], sem_seg_file_name=str(folder / "semantic.png"))
    instance = dict(records(synthetic_prefix, "instance")[0], annotations=[])
    return {"panoptic": panoptic, "sem_seg": sem_seg, "instance": instance}


@pytest.mark.parametrize("name", list(MAPPER_DATASETS))
def test_image_without_segments_gives_empty_instances(base_cfg, empty_records, name):
    out = build_mapper(make_cfg(base_cfg, name, SIZE_DIVISIBILITY=48))(empty_records[MAPPER_DATASETS[name]])
    size = base_cfg.INPUT.IMAGE_SIZE if "lsj" in name else 96  # 64 padded to a multiple of 48
    check_common_outputs(out, size, size)
    assert len(out["instances"]) == 0 and out["instances"].gt_masks.shape == (0, size, size)
    if "lsj" in name:
        assert out["instances"].gt_boxes.tensor.shape == (0, 4)


def test_semantic_label_beyond_num_classes_says_to_fix_num_classes(base_cfg, synthetic_prefix):
    cfg = make_cfg(base_cfg, "mask_former_semantic")
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    record = records(synthetic_prefix, "sem_seg")[0]
    labels = np.unique(np.asarray(Image.open(record["sem_seg_file_name"])))
    too_large = [int(c) for c in labels if 6 <= c != IGNORE_LABEL]
    assert too_large, "test record should use class 6 or 7"
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{record['sem_seg_file_name']} has class id(s) {too_large}") + ".*NUM_CLASSES=6.*"
        rf"Set MODEL\.SEM_SEG_HEAD\.NUM_CLASSES to the dataset's number of classes",
    ):
        build_mapper(cfg)(record)


@pytest.mark.parametrize("name", ["mask_former_panoptic", "coco_panoptic_lsj", "mask_former_instance"])
def test_category_beyond_num_classes_says_to_fix_num_classes(base_cfg, synthetic_prefix, name):
    cfg = make_cfg(base_cfg, name)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 1
    record = records(synthetic_prefix, MAPPER_DATASETS[name])[0]
    with pytest.raises(
        DatasetError, match=r"class id\(s\) \[.*\] that are >= MODEL\.SEM_SEG_HEAD\.NUM_CLASSES=1"
    ):
        build_mapper(cfg)(record)


def test_record_of_the_wrong_kind_names_the_mapper(base_cfg, synthetic_prefix):
    instance_record = records(synthetic_prefix, "instance")[0]
    with pytest.raises(DatasetError, match="no 'sem_seg_file_name'.*DATASET_MAPPER_NAME"):
        build_mapper(make_cfg(base_cfg, "mask_former_semantic"))(instance_record)
    with pytest.raises(DatasetError, match="no 'pan_seg_file_name'"):
        build_mapper(make_cfg(base_cfg, "coco_panoptic_lsj"))(instance_record)
    with pytest.raises(DatasetError, match="no 'annotations'"):
        build_mapper(make_cfg(base_cfg, "mask_former_instance"))(records(synthetic_prefix, "panoptic")[0])
