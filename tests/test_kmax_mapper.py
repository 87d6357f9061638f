"""kMaX-DeepLab's panoptic training mapper (``kmax_panoptic``) on the synthetic set: outputs,
copy-paste, padding, re-draws, bad input."""

import copy
import logging
import pickle

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.env import seed_all_rng
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

import kmax_m2f
from kmax_m2f.config import ConfigError
from kmax_m2f.data import MAPPER_REGISTRY, build_mapper
from kmax_m2f.data.datasets.checks import DatasetError
from kmax_m2f.systems.kmax_deeplab.mapper import KMaXPanopticDatasetMapper
from kmax_m2f.data.panoptic import read_panoptic_ids

NUM_CLASSES = 8  # synthetic categories, contiguous: things 0-4, stuff 5-7
THING_CLASSES = set(range(5))
IGNORE = 255
SIZE = 64  # synthetic image size (tests/conftest.py)
HALF = T.ResizeScale(min_scale=0.5, max_scale=0.5, target_height=SIZE, target_width=SIZE)
MAPPER_LOGGER = "kmax_m2f.systems.kmax_deeplab.mapper"


@pytest.fixture(scope="module")
def cfg(synthetic_prefix):
    """The kMaX recipe at an odd, small size (65: stride-4 grid of 17)."""
    cfg = kmax_m2f.build_config()
    cfg.defrost()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DATASET_MAPPER_NAME = "kmax_panoptic"
    cfg.INPUT.IMAGE_SIZE = 65
    cfg.INPUT.MIN_SCALE = 0.5
    cfg.INPUT.MAX_SCALE = 2.0
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.DATASETS.TRAIN = (f"{synthetic_prefix}_panoptic_train",)
    return cfg


@pytest.fixture(scope="module")
def records(synthetic_prefix) -> list[dict]:
    return DatasetCatalog.get(f"{synthetic_prefix}_panoptic_train")


def make_mapper(cfg, **overrides) -> KMaXPanopticDatasetMapper:
    """The cfg mapper with some constructor arguments replaced."""
    args = KMaXPanopticDatasetMapper.from_config(cfg)
    args.update(overrides)
    return KMaXPanopticDatasetMapper(**args)


def fixed_mapper(cfg, partner: dict, **overrides) -> KMaXPanopticDatasetMapper:
    """No main augmentation (the 64 px image fills a 64 px canvas), the partner always halved to
    the top-left 32 px, always the same partner, no colour jitter, no re-draw."""
    args = dict(
        augmentations=[],
        partner_augmentations=[HALF],
        image_size=(SIZE, SIZE),
        partner_records=[partner],
        labeled_pixels_threshold=0,
    )
    return make_mapper(cfg, **{**args, **overrides})


def augmented(record: dict, augmentations: list) -> tuple[np.ndarray, np.ndarray]:
    """[S, S, 3] image and [S, S] segment ids of ``record`` after deterministic
    ``augmentations``, top-left on a zero SIZE canvas."""
    image = utils.read_image(record["file_name"], "RGB")
    ids = read_panoptic_ids(record["pan_seg_file_name"], record["segments_info"])
    aug_input = T.AugInput(image)
    transforms = T.AugmentationList(augmentations)(aug_input)
    ids = rgb2id(transforms.apply_segmentation(id2rgb(ids)))
    h, w = ids.shape
    image_canvas = np.zeros((SIZE, SIZE, 3), np.uint8)
    ids_canvas = np.zeros((SIZE, SIZE), np.int64)
    image_canvas[:h, :w] = aug_input.image
    ids_canvas[:h, :w] = ids
    return image_canvas, ids_canvas


def check_outputs(out: dict, height: int, width: int) -> None:
    """Shapes, dtypes, and targets that describe one consistent panoptic labelling."""
    grid = (-(-height // 4), -(-width // 4))
    image, real, sem_seg = out["image"], out["is_real_pixels"], out["sem_seg_gt"]
    instances = out["instances"]
    assert image.dtype == torch.uint8 and image.shape == (3, height, width)
    assert real.dtype == torch.bool and real.shape == (height, width)
    assert sem_seg.dtype == torch.int64 and sem_seg.shape == grid
    assert instances.image_size == (height, width)
    classes, masks = instances.gt_classes, instances.gt_masks
    assert classes.dtype == torch.int64 and classes.shape == (len(instances),)
    assert masks.dtype == torch.bool and masks.shape == (len(instances), *grid)
    assert ((classes >= 0) & (classes < NUM_CLASSES)).all()
    assert masks.flatten(1).any(1).all(), "every mask is non-empty"
    assert masks.sum(0).max() <= 1, "masks do not overlap"
    labels = torch.full(grid, IGNORE, dtype=torch.int64)
    for cls, mask in zip(classes, masks):
        labels[mask] = cls
    assert (labels == sem_seg).all()
    stuff = [c for c in classes.tolist() if c not in THING_CLASSES]
    assert len(stuff) == len(set(stuff)), "one mask per stuff class"
    assert (image[:, ~real] == 0).all()
    assert (sem_seg[~real[::4, ::4]] == IGNORE).all()
    for key in ("file_name", "image_id", "height", "width"):
        assert key in out
    assert "pan_seg_file_name" not in out and "segments_info" not in out


def shared_stuff_pair(records: list[dict]) -> tuple[dict, dict]:
    """Two different records with a stuff class in common."""
    def stuff(record):
        return {s["category_id"] for s in record["segments_info"] if not s["isthing"]}

    return next((a, b) for a in records for b in records if a is not b and stuff(a) & stuff(b))


def partner_with_visible_thing(records: list[dict]) -> dict:
    """A record with a thing that stays on the stride-4 grid once halved."""
    for record in records:
        grid_ids = augmented(record, [HALF])[1][::4, ::4]
        if any(s["isthing"] and (grid_ids == s["id"]).any() for s in record["segments_info"]):
            return record
    raise AssertionError("no synthetic record has a thing large enough")


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def test_registered_mapper_outputs_at_odd_size(cfg, records):
    assert "kmax_panoptic" in MAPPER_REGISTRY
    mapper = build_mapper(cfg)
    assert type(mapper) is KMaXPanopticDatasetMapper
    assert mapper.thing_class_ids == THING_CLASSES and mapper.copy_paste
    assert len(mapper.partner_records) == len(records)
    pickle.dumps(mapper)  # data-loader workers may receive the mapper pickled
    with pytest.raises(ValueError, match="training"):
        build_mapper(cfg, is_train=False)

    seed_all_rng(0)
    for record in records:
        out = mapper(record)
        check_outputs(out, 65, 65)
        assert len(out["instances"]) > 0
    assert "sem_seg_file_name" not in out and "sem_seg_file_name" in record


def test_random_output_is_reproducible_with_a_seed(cfg, records):
    mapper = build_mapper(cfg)

    def run(seed):
        seed_all_rng(seed)  # numpy: resize, crop, flip; Python's random: colours, partners, pastes
        return [mapper(record) for record in records[:4]]

    first, second, other = run(1), run(1), run(2)
    for a, b in zip(first, second):
        assert a["file_name"] == b["file_name"]
        for key in ("image", "is_real_pixels", "sem_seg_gt"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)
        assert torch.equal(a["instances"].gt_masks, b["instances"].gt_masks)
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other))


# ---------------------------------------------------------------------------------------------
# Copy-paste
# ---------------------------------------------------------------------------------------------
def test_copy_paste_pastes_all_partner_things_and_some_stuff(cfg, records):
    main = records[0]
    partner = partner_with_visible_thing(records[1:])
    partner_image, partner_ids = augmented(partner, [HALF])
    mapper = fixed_mapper(cfg, partner)
    main_image, _ = augmented(main, [])
    stuff_pasted = []
    things_checked = 0
    for seed in range(12):
        seed_all_rng(seed)
        out = mapper(main)
        check_outputs(out, SIZE, SIZE)
        assert out["file_name"] == main["file_name"] and out["is_real_pixels"].all()
        image = out["image"].permute(1, 2, 0).numpy()
        masks = out["instances"].gt_masks.numpy()
        classes = out["instances"].gt_classes.tolist()
        pasted = np.zeros((SIZE, SIZE), bool)
        for segment in partner["segments_info"]:
            region = partner_ids == segment["id"]
            assert (main_image[region] != partner_image[region]).any()
            from_partner = (image[region] == partner_image[region]).all()
            # A segment is pasted whole or not at all.
            assert from_partner or (image[region] == main_image[region]).all()
            if not from_partner:
                assert not segment["isthing"], "every partner thing is pasted"
                stuff_pasted.append(False)
                continue
            pasted |= region
            grid_region = region[::4, ::4]
            assert (out["sem_seg_gt"].numpy()[grid_region] == segment["category_id"]).all()
            if segment["isthing"] and grid_region.any():
                # Pasted last, nothing covers it: its target is exactly its own grid pixels.
                things_checked += 1
                assert any(
                    (mask == grid_region).all() and cls == segment["category_id"]
                    for cls, mask in zip(classes, masks)
                )
            elif not segment["isthing"]:
                stuff_pasted.append(True)
        assert pasted.any()
        assert (image[~pasted] == main_image[~pasted]).all()
    assert things_checked
    assert any(stuff_pasted) and not all(stuff_pasted), "a random subset of the stuff is pasted"


def test_stuff_of_one_class_from_both_images_is_one_mask(cfg, records):
    main, partner = shared_stuff_pair(records)
    mapper = fixed_mapper(cfg, partner)
    main_image, main_ids = augmented(main, [])
    partner_image, partner_ids = augmented(partner, [HALF])
    merged = 0
    for seed in range(12):
        seed_all_rng(seed)
        out = mapper(main)
        check_outputs(out, SIZE, SIZE)
        image = out["image"].permute(1, 2, 0).numpy()[::4, ::4]
        # Grid pixels whose colour (and so label) came from the partner / from the main image.
        from_partner = (image == partner_image[::4, ::4]).all(-1) & (partner_ids[::4, ::4] > 0)
        from_main = (image == main_image[::4, ::4]).all(-1) & ~from_partner
        for cls, mask in zip(out["instances"].gt_classes.tolist(), out["instances"].gt_masks.numpy()):
            if cls in THING_CLASSES:
                continue
            main_part = mask & from_main & (main_ids[::4, ::4] > 0)
            partner_part = mask & from_partner
            assert (mask == main_part | partner_part).all()
            merged += bool(main_part.any() and partner_part.any())
    assert merged, "the test pair never pasted a stuff class the main image shows"


def test_padding_is_ignored_and_pasted_pixels_are_real(cfg, records):
    quarter = T.ResizeScale(min_scale=0.25, max_scale=0.25, target_height=SIZE, target_width=SIZE)
    main, partner = records[2], records[3]

    alone = fixed_mapper(cfg, partner, augmentations=[HALF], copy_paste=False)(main)
    check_outputs(alone, SIZE, SIZE)
    real = torch.zeros((SIZE, SIZE), dtype=torch.bool)
    real[:32, :32] = True
    assert torch.equal(alone["is_real_pixels"], real)
    assert (alone["image"][:, 32:] == 0).all() and (alone["image"][:, :, 32:] == 0).all()
    assert (alone["sem_seg_gt"][8:] == IGNORE).all() and (alone["sem_seg_gt"][:, 8:] == IGNORE).all()
    assert (alone["sem_seg_gt"][:8, :8] != IGNORE).all()  # synthetic images have no void

    # A 16 px main image under a 32 px partner: real wherever either image put a pixel.
    mapper = fixed_mapper(cfg, partner, augmentations=[quarter])
    partner_image, _ = augmented(partner, [HALF])
    beyond_main = torch.ones((SIZE, SIZE), dtype=torch.bool)
    beyond_main[:16, :16] = False
    for seed in range(4):
        seed_all_rng(seed)
        out = mapper(main)
        check_outputs(out, SIZE, SIZE)
        real = out["is_real_pixels"]
        assert real[:16, :16].all() and not real[32:].any() and not real[:, 32:].any()
        pasted = real & beyond_main
        assert pasted.any(), "partner things reach beyond the main image"
        image = out["image"].permute(1, 2, 0)
        assert torch.equal(image[pasted], torch.from_numpy(partner_image)[pasted])
        assert (out["sem_seg_gt"][pasted[::4, ::4]] != IGNORE).all()


def test_things_from_metadata_when_segments_lack_isthing(cfg, records):
    """detectron2's Cityscapes records have no 'isthing': the metadata's thing ids decide."""
    stripped = copy.deepcopy(records[:4])
    for record in stripped:
        for segment in record["segments_info"]:
            del segment["isthing"]
    with_flag = make_mapper(cfg, partner_records=records[:4])
    from_metadata = make_mapper(cfg, partner_records=stripped)
    for i in range(4):
        seed_all_rng(i)
        expected = with_flag(records[i])
        seed_all_rng(i)
        out = from_metadata(stripped[i])
        assert torch.equal(out["image"], expected["image"])
        assert torch.equal(out["instances"].gt_classes, expected["instances"].gt_classes)
        assert torch.equal(out["instances"].gt_masks, expected["instances"].gt_masks)

    unknown = make_mapper(cfg, partner_records=stripped, thing_class_ids=None)
    with pytest.raises(DatasetError, match="no 'isthing' field.*thing_dataset_id_to_contiguous_id"):
        unknown(stripped[0])


# ---------------------------------------------------------------------------------------------
# Re-draws
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unlabelled_records(records, tmp_path_factory) -> dict[str, dict]:
    """A record whose image is all void, and one whose segments are all crowd."""
    void_png = tmp_path_factory.mktemp("kmax_void") / "void.png"
    Image.fromarray(id2rgb(np.zeros((SIZE, SIZE), np.int64))).save(void_png)
    void = dict(records[0], segments_info=[], pan_seg_file_name=str(void_png))
    crowd = copy.deepcopy(records[1])
    for segment in crowd["segments_info"]:
        segment["iscrowd"] = 1
    return {"void": void, "crowd": crowd}


def debug_messages(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == MAPPER_LOGGER and r.levelno == logging.DEBUG
    ]


@pytest.mark.parametrize("kind", ["void", "crowd"])
def test_sample_without_masks_is_drawn_again(cfg, records, unlabelled_records, caplog, kind):
    caplog.set_level(logging.DEBUG, logger=MAPPER_LOGGER)
    empty, labelled = unlabelled_records[kind], records[5]
    # The pool lacks the empty record: only a draw of another record can give masks.
    mapper = make_mapper(cfg, partner_records=[labelled], copy_paste=False)
    seed_all_rng(0)
    out = mapper(empty)
    check_outputs(out, 65, 65)
    assert out["file_name"] == labelled["file_name"] and len(out["instances"]) > 0
    assert debug_messages(caplog) and "0 masks" in debug_messages(caplog)[0]


def test_redraws_are_bounded_and_keep_the_best_draw(cfg, records, unlabelled_records, caplog):
    caplog.set_level(logging.DEBUG, logger=MAPPER_LOGGER)
    void = unlabelled_records["void"]
    out = make_mapper(cfg, partner_records=[void], copy_paste=False, max_draws=3)(void)
    check_outputs(out, 65, 65)
    assert out["instances"].gt_masks.shape == (0, 17, 17) and (out["sem_seg_gt"] == IGNORE).all()
    assert len(debug_messages(caplog)) == 3

    # Never enough labelled pixels: the draw with the most of them is returned.
    caplog.clear()
    mapper = make_mapper(cfg, partner_records=[records[0]], labeled_pixels_threshold=17 * 17, max_draws=4)
    seed_all_rng(0)
    out = mapper(void)
    check_outputs(out, 65, 65)
    assert len(debug_messages(caplog)) == 4
    assert len(out["instances"]) > 0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_dataset_without_panoptic_annotations_is_named(cfg, synthetic_prefix):
    bad = cfg.clone()
    bad.DATASETS.TRAIN = (f"{synthetic_prefix}_instance_train",)
    message = rf"'{synthetic_prefix}_instance_train'.*no COCO-panoptic annotations"
    with pytest.raises(DatasetError, match=message):
        build_mapper(bad)
    bad.DATASETS.TRAIN = ()
    with pytest.raises(ConfigError, match="DATASETS.TRAIN is empty"):
        build_mapper(bad)

    instance_record = DatasetCatalog.get(f"{synthetic_prefix}_instance_train")[0]
    with pytest.raises(DatasetError, match="no 'pan_seg_file_name'.*DATASET_MAPPER_NAME"):
        build_mapper(cfg)(instance_record)


@pytest.mark.parametrize("mode,suffix", [("L", ".jpg"), ("RGBA", ".png")])
def test_grey_and_rgba_images_become_three_channels(cfg, records, tmp_path, mode, suffix):
    record = dict(records[0])
    path = tmp_path / f"image_{mode}{suffix}"
    Image.open(record["file_name"]).convert(mode).save(path)
    record["file_name"] = str(path)
    # No partner (its colour pixels would hide whether the grey image stayed grey), no re-draw.
    out = make_mapper(cfg, copy_paste=False, partner_records=None, labeled_pixels_threshold=0)(record)
    check_outputs(out, 65, 65)
    if mode == "L":
        red, green, blue = out["image"]
        assert torch.equal(red, green) and torch.equal(green, blue)
