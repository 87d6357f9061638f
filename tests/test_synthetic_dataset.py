"""The synthetic panoptic dataset: file consistency, determinism, catalogs and detectron2's evaluators."""
import hashlib
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator
from detectron2.structures import BitMasks, Instances
from panopticapi.evaluation import pq_compute
from PIL import Image

from kmax_m2f.data.panoptic import read_panoptic_ids
from kmax_m2f.data.synthetic_generator import STUFF_IDS, SYNTHETIC_CATEGORIES, THING_IDS, generate_synthetic_panoptic

from .conftest import SYNTHETIC_KWARGS


def _load(root, name):
    with open(os.path.join(root, "annotations", name)) as f:
        return json.load(f)


def _tree_digest(root) -> str:
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def test_ground_truth_against_itself_gives_pq_100(datasets_dir):
    root = str(datasets_dir / "synthetic")
    json_file = os.path.join(root, "annotations", "panoptic_val.json")
    result = pq_compute(json_file, json_file, os.path.join(root, "panoptic_val"), os.path.join(root, "panoptic_val"))
    assert result["All"]["pq"] == pytest.approx(1.0)
    assert result["Things"]["pq"] == pytest.approx(1.0) and result["Stuff"]["pq"] == pytest.approx(1.0)


@pytest.mark.parametrize("split", ["train", "val"])
def test_segments_ids_areas_and_labels_are_consistent(datasets_dir, split):
    root = str(datasets_dir / "synthetic")
    panoptic = _load(root, f"panoptic_{split}.json")
    instances = _load(root, f"instances_{split}.json")
    contiguous = {c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)}
    assert len(panoptic["images"]) == SYNTHETIC_KWARGS[f"num_{split}"]
    assert {c["id"] for c in panoptic["categories"]} == set(THING_IDS) | set(STUFF_IDS)
    rles_by_image = {}
    for ann in instances["annotations"]:
        rles_by_image.setdefault(ann["image_id"], []).append(ann)

    seen_categories = set()
    for image, ann in zip(panoptic["images"], panoptic["annotations"]):
        assert image["id"] == ann["image_id"]
        assert os.path.isfile(os.path.join(root, split, image["file_name"]))
        ids = read_panoptic_ids(os.path.join(root, f"panoptic_{split}", ann["file_name"]), ann["segments_info"])
        semantic = np.array(Image.open(os.path.join(root, f"panoptic_semseg_{split}", ann["file_name"])))
        assert (ids > 0).all(), "every pixel belongs to a segment"
        assert len({s["id"] for s in ann["segments_info"]}) == len(ann["segments_info"])
        things = [s for s in ann["segments_info"] if s["category_id"] in THING_IDS]
        assert 1 <= len(things) <= 5
        for segment in ann["segments_info"]:
            mask = ids == segment["id"]
            seen_categories.add(segment["category_id"])
            assert segment["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert (semantic[mask] == contiguous[segment["category_id"]]).all()
        # The instances JSON holds exactly the thing segments, with the same masks.
        instance_anns = rles_by_image.get(image["id"], [])
        assert len(instance_anns) == len(things)
        for segment, instance in zip(things, instance_anns):
            assert instance["category_id"] == segment["category_id"]
            assert (mask_util.decode(instance["segmentation"]).astype(bool) == (ids == segment["id"])).all()
    if split == "train":
        assert seen_categories == set(THING_IDS) | set(STUFF_IDS)


def test_generation_is_deterministic(tmp_path, datasets_dir):
    kwargs = dict(SYNTHETIC_KWARGS, num_train=3, num_val=1)
    generate_synthetic_panoptic(str(tmp_path / "a"), **kwargs)
    generate_synthetic_panoptic(str(tmp_path / "b"), **kwargs)
    generate_synthetic_panoptic(str(tmp_path / "c"), **dict(kwargs, seed=1))
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_catalog_records_and_metadata(synthetic_prefix):
    records = DatasetCatalog.get(f"{synthetic_prefix}_panoptic_val")
    meta = MetadataCatalog.get(f"{synthetic_prefix}_panoptic_val")
    assert len(records) == SYNTHETIC_KWARGS["num_val"]
    record = records[0]
    for key in ("file_name", "image_id", "pan_seg_file_name", "sem_seg_file_name", "segments_info"):
        assert key in record
    assert all(os.path.isfile(record[k]) for k in ("file_name", "pan_seg_file_name", "sem_seg_file_name"))
    for segment in record["segments_info"]:
        assert 0 <= segment["category_id"] < len(SYNTHETIC_CATEGORIES)
        assert segment["isthing"] == (segment["category_id"] < len(THING_IDS))
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert meta.stuff_dataset_id_to_contiguous_id[13] == 7

    sem_records = DatasetCatalog.get(f"{synthetic_prefix}_sem_seg_train")
    assert len(sem_records) == SYNTHETIC_KWARGS["num_train"]
    assert MetadataCatalog.get(f"{synthetic_prefix}_sem_seg_train").evaluator_type == "sem_seg"
    instance_records = DatasetCatalog.get(f"{synthetic_prefix}_instance_train")
    assert MetadataCatalog.get(f"{synthetic_prefix}_instance_train").thing_classes == [
        c["name"] for c in SYNTHETIC_CATEGORIES if c["isthing"]
    ]
    assert all(len(r["annotations"]) >= 1 for r in instance_records)


def _oracle_panoptic(record):
    ids = read_panoptic_ids(record["pan_seg_file_name"], record["segments_info"])
    segments = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]} for s in record["segments_info"]]
    return torch.from_numpy(ids.astype(np.int32)), segments


def test_detectron2_evaluators_run_unchanged_and_score_oracles_at_100(synthetic_prefix, tmp_path):
    panoptic_name = f"{synthetic_prefix}_panoptic_val"
    records = DatasetCatalog.get(panoptic_name)
    num_classes = len(SYNTHETIC_CATEGORIES)

    panoptic_eval = COCOPanopticEvaluator(panoptic_name, str(tmp_path / "pan"))
    semseg_eval = SemSegEvaluator(panoptic_name, distributed=False, output_dir=str(tmp_path / "sem"))
    instance_name = f"{synthetic_prefix}_instance_val"
    instance_records = {r["image_id"]: r for r in DatasetCatalog.get(instance_name)}
    instance_eval = COCOEvaluator(instance_name, tasks=("segm",), distributed=False, output_dir=str(tmp_path / "ins"))
    for evaluator in (panoptic_eval, semseg_eval, instance_eval):
        evaluator.reset()

    for record in records:
        inputs = [{"file_name": record["file_name"], "image_id": record["image_id"]}]
        panoptic_seg = _oracle_panoptic(record)
        panoptic_eval.process(inputs, [{"panoptic_seg": panoptic_seg}])

        semantic = np.array(Image.open(record["sem_seg_file_name"]), dtype=np.int64)
        scores = torch.nn.functional.one_hot(torch.from_numpy(semantic), num_classes).permute(2, 0, 1).float()
        semseg_eval.process(inputs, [{"sem_seg": scores}])

        instance_record = instance_records[record["image_id"]]
        annotations = instance_record["annotations"]
        instances = Instances((instance_record["height"], instance_record["width"]))
        masks = np.stack([mask_util.decode(a["segmentation"]) for a in annotations]).astype(bool)
        instances.pred_masks = torch.from_numpy(masks)
        instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
        instances.scores = torch.ones(len(annotations))
        instances.pred_classes = torch.tensor([a["category_id"] for a in annotations])
        instance_eval.process(inputs, [{"instances": instances}])

    assert panoptic_eval.evaluate()["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert semseg_eval.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert instance_eval.evaluate()["segm"]["AP"] == pytest.approx(100.0)
