"""The shipped configs/: every YAML merges into our config (unknown keys fail loudly), and the
published Mask2Former recipes (facebookresearch/Mask2Former configs/, MODEL_ZOO) and kMaX-DeepLab
recipes (the paper and bytedance/kmax-deeplab) are intact."""
from pathlib import Path

import pytest
import yaml

from kmax_m2f import build_config
from kmax_m2f.config import fixed_image_size

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# configs/synthetic/ holds the small quick-start config, tested with the training tools.
ALL_YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml") if "synthetic" not in p.relative_to(CONFIGS).parts)
KMAX_YAMLS = [p for p in ALL_YAMLS if p.name.startswith("kmax_")]
STRUCT_TOKEN_YAMLS = [p for p in ALL_YAMLS if "structtoken" in p.relative_to(CONFIGS).parts]
RESTR_YAMLS = [p for p in ALL_YAMLS if p.relative_to(CONFIGS).parts[0] == "refer"]
LOCA_YAMLS = [p for p in ALL_YAMLS if "pretraining" in p.relative_to(CONFIGS).parts]
YAMLS = [p for p in ALL_YAMLS if p not in KMAX_YAMLS + STRUCT_TOKEN_YAMLS + RESTR_YAMLS + LOCA_YAMLS]
IDS = [str(p.relative_to(CONFIGS)) for p in YAMLS]

MASK2FORMER_TREE = {
    "coco/panoptic-segmentation": 8,
    "coco/instance-segmentation": 8,
    "ade20k/semantic-segmentation": 8,
    "ade20k/panoptic-segmentation": 3,
    "ade20k/instance-segmentation": 3,
    "cityscapes/semantic-segmentation": 7,
    "cityscapes/panoptic-segmentation": 7,
    "cityscapes/instance-segmentation": 7,
}


def cfg_of(rel: str):
    return build_config(str(CONFIGS / rel))


def test_tree_is_complete():
    assert YAMLS, "no config found under configs/"
    for task_dir, n in MASK2FORMER_TREE.items():
        found = sorted(p for p in (CONFIGS / task_dir).rglob("*.yaml") if p in YAMLS)
        assert len(found) == n, (task_dir, [str(p.relative_to(CONFIGS)) for p in found])
        assert len(list((CONFIGS / task_dir).glob("Base-*.yaml"))) == 1, task_dir


@pytest.mark.parametrize("path", YAMLS, ids=IDS)
def test_config_merges(path):
    # Plain YAML: no python tags, so detectron2 never falls back to yaml.unsafe_load.
    with open(path) as f:
        yaml.safe_load(f)
    cfg = build_config(str(path))
    assert cfg.INPUT.DATASET_MAPPER_NAME in {
        "mask_former_semantic", "mask_former_panoptic", "mask_former_instance",
        "coco_instance_lsj", "coco_panoptic_lsj",
    }
    if not path.name.startswith("Base-"):
        assert cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
        assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "MSDeformAttnPixelDecoder"
        assert cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME == "MultiScaleMaskedTransformerDecoder"
        assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
        assert cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS == 12544
    # The shared optimisation recipe.
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 1e-4
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.WEIGHT_DECAY == 0.05
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.01
    assert cfg.SOLVER.AMP.ENABLED
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.280, 103.530]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.120, 57.375]
    if cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer":
        assert cfg.MODEL.WEIGHTS.startswith("swin_") and cfg.MODEL.WEIGHTS.endswith(".pkl")


def test_components_are_registered():
    """Names the configs use exist in the registries (the configs would build)."""
    import kmax_m2f  # noqa: F401  (registers the models)
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    from kmax_m2f.data.mappers import MAPPER_REGISTRY
    from kmax_m2f.systems.kmax_deeplab import KMAX_DECODER_REGISTRY
    from kmax_m2f.systems.mask2former import TRANSFORMER_DECODER_REGISTRY

    for path in YAMLS:
        cfg = build_config(str(path))
        where = str(path.relative_to(CONFIGS))
        assert cfg.INPUT.DATASET_MAPPER_NAME in MAPPER_REGISTRY, where
        assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY, where
        for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
            assert name in DatasetCatalog.list(), (where, name)
        if path.name.startswith("Base-"):
            continue
        assert cfg.MODEL.META_ARCHITECTURE in META_ARCH_REGISTRY, where
        assert cfg.MODEL.SEM_SEG_HEAD.NAME in SEM_SEG_HEADS_REGISTRY, where
        if cfg.MODEL.META_ARCHITECTURE == "MaskFormer":
            assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME in SEM_SEG_HEADS_REGISTRY, where
            assert cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME in TRANSFORMER_DECODER_REGISTRY, where
        if cfg.MODEL.META_ARCHITECTURE == "kMaXDeepLab":
            assert cfg.MODEL.KMAX_DEEPLAB.PIXEL_DEC.NAME in SEM_SEG_HEADS_REGISTRY, where
            assert cfg.MODEL.KMAX_DEEPLAB.TRANS_DEC.NAME in KMAX_DECODER_REGISTRY, where


def test_coco_panoptic_r50():
    cfg = cfg_of("coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml")
    assert cfg.SOLVER.MAX_ITER == 368750
    assert tuple(cfg.SOLVER.STEPS) == (327778, 355092)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
    assert cfg.SOLVER.WARMUP_ITERS == 10
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 1e-4
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 133
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 100
    assert cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON
    assert cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON and cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON
    assert cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD == 0.8
    assert cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD == 0.8
    assert (cfg.MODEL.MASK_FORMER.CLASS_WEIGHT, cfg.MODEL.MASK_FORMER.MASK_WEIGHT,
            cfg.MODEL.MASK_FORMER.DICE_WEIGHT, cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT) == (2.0, 5.0, 5.0, 0.1)
    assert cfg.INPUT.DATASET_MAPPER_NAME == "coco_panoptic_lsj"
    assert (fixed_image_size(cfg), cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE) == ((1024, 1024), 0.1, 2.0)
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train_panoptic",)
    assert tuple(cfg.DATASETS.TEST) == ("coco_2017_val_panoptic_with_sem_seg",)
    r101 = cfg_of("coco/panoptic-segmentation/maskformer2_R101_bs16_50ep.yaml")
    assert r101.MODEL.RESNETS.DEPTH == 101 and r101.SOLVER.MAX_ITER == 368750


def test_coco_panoptic_swin_large():
    cfg = cfg_of("coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer"
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 200
    assert cfg.MODEL.SWIN.EMBED_DIM == 192
    assert list(cfg.MODEL.SWIN.DEPTHS) == [2, 2, 18, 2]
    assert list(cfg.MODEL.SWIN.NUM_HEADS) == [6, 12, 24, 48]
    assert cfg.MODEL.SWIN.WINDOW_SIZE == 12
    assert cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE == 384
    assert cfg.MODEL.WEIGHTS == "swin_large_patch4_window12_384_22k.pkl"
    # 100 epochs.
    assert cfg.SOLVER.MAX_ITER == 737500
    assert tuple(cfg.SOLVER.STEPS) == (655556, 710184)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 133


@pytest.mark.parametrize("variant, dim, depths, heads, window, pre", [
    ("tiny_bs16_50ep", 96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224),
    ("small_bs16_50ep", 96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 224),
    ("base_384_bs16_50ep", 128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384),
    ("base_IN21k_384_bs16_50ep", 128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384),
])
@pytest.mark.parametrize("task", ["panoptic-segmentation", "instance-segmentation"])
def test_coco_swin_variants(task, variant, dim, depths, heads, window, pre):
    cfg = cfg_of(f"coco/{task}/swin/maskformer2_swin_{variant}.yaml")
    assert cfg.MODEL.SWIN.EMBED_DIM == dim
    assert list(cfg.MODEL.SWIN.DEPTHS) == depths and list(cfg.MODEL.SWIN.NUM_HEADS) == heads
    assert cfg.MODEL.SWIN.WINDOW_SIZE == window and cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE == pre
    assert cfg.MODEL.SWIN.DROP_PATH_RATE == 0.3
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 100
    assert cfg.SOLVER.MAX_ITER == 368750


def test_coco_instance():
    cfg = cfg_of("coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml")
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 80
    assert cfg.INPUT.DATASET_MAPPER_NAME == "coco_instance_lsj"
    t = cfg.MODEL.MASK_FORMER.TEST
    assert (t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON) == (False, True, False)
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",) and tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)
    assert cfg.SOLVER.MAX_ITER == 368750 and tuple(cfg.SOLVER.STEPS) == (327778, 355092)
    large = cfg_of("coco/instance-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml")
    assert large.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 200 and large.SOLVER.MAX_ITER == 737500


def test_ade20k_semantic_r50():
    cfg = cfg_of("ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml")
    assert cfg.SOLVER.MAX_ITER == 160000
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    assert cfg.SOLVER.POLY_LR_POWER == 0.9 and cfg.SOLVER.WARMUP_ITERS == 0
    assert cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute"
    assert tuple(cfg.INPUT.CROP.SIZE) == (512, 512)
    assert cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 1.0
    assert cfg.INPUT.COLOR_AUG_SSD and cfg.INPUT.SIZE_DIVISIBILITY == 512
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [int(x * 0.1 * 512) for x in range(5, 21)]
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST) == (512, 2048, 2048)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_semantic"
    t = cfg.MODEL.MASK_FORMER.TEST
    assert (t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON) == (True, False, False)
    assert tuple(cfg.DATASETS.TRAIN) == ("ade20k_sem_seg_train",)
    # The official R101 file is named "90k" but inherits the 160k schedule.
    r101 = cfg_of("ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml")
    assert r101.SOLVER.MAX_ITER == 160000 and r101.MODEL.RESNETS.DEPTH == 101


@pytest.mark.parametrize("variant, crop", [
    ("tiny_bs16_160k", 512), ("small_bs16_160k", 512), ("base_384_bs16_160k_res640", 640),
    ("base_IN21k_384_bs16_160k_res640", 640), ("large_IN21k_384_bs16_160k_res640", 640),
])
def test_ade20k_semantic_swin(variant, crop):
    cfg = cfg_of(f"ade20k/semantic-segmentation/swin/maskformer2_swin_{variant}.yaml")
    assert tuple(cfg.INPUT.CROP.SIZE) == (crop, crop)
    assert cfg.INPUT.SIZE_DIVISIBILITY == crop and cfg.INPUT.MIN_SIZE_TEST == crop
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [int(x * 0.1 * crop) for x in range(5, 21)]
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 100  # 200 only for panoptic / instance Swin-L
    assert cfg.SOLVER.MAX_ITER == 160000


@pytest.mark.parametrize("task, mapper, ncls", [
    ("panoptic-segmentation", "mask_former_panoptic", 150),
    ("instance-segmentation", "mask_former_instance", 100),
])
def test_ade20k_panoptic_instance(task, mapper, ncls):
    cfg = cfg_of(f"ade20k/{task}/maskformer2_R50_bs16_160k.yaml")
    assert cfg.INPUT.DATASET_MAPPER_NAME == mapper
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == ncls
    assert tuple(cfg.INPUT.CROP.SIZE) == (640, 640)  # 640 for every backbone in these two tasks
    assert cfg.SOLVER.MAX_ITER == 160000 and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    large = cfg_of(f"ade20k/{task}/swin/maskformer2_swin_large_IN21k_384_bs16_160k.yaml")
    assert large.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 200


@pytest.mark.parametrize("task, mapper, ncls, swin_l_queries, flags", [
    ("semantic-segmentation", "mask_former_semantic", 19, 100, (True, False, False)),
    ("panoptic-segmentation", "mask_former_panoptic", 19, 200, (True, True, True)),
    ("instance-segmentation", "mask_former_instance", 8, 200, (False, True, False)),
])
def test_cityscapes(task, mapper, ncls, swin_l_queries, flags):
    cfg = cfg_of(f"cityscapes/{task}/maskformer2_R50_bs16_90k.yaml")
    assert cfg.SOLVER.MAX_ITER == 90000
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    assert tuple(cfg.INPUT.CROP.SIZE) == (512, 1024)
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [int(x * 0.1 * 1024) for x in range(5, 21)]
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST) == (1024, 4096, 2048)
    assert cfg.INPUT.SIZE_DIVISIBILITY == -1
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == ncls
    assert cfg.MODEL.RESNETS.NORM == "SyncBN"
    assert cfg.INPUT.DATASET_MAPPER_NAME == mapper
    t = cfg.MODEL.MASK_FORMER.TEST
    assert (t.SEMANTIC_ON, t.INSTANCE_ON, t.PANOPTIC_ON) == flags
    large = cfg_of(f"cityscapes/{task}/swin/maskformer2_swin_large_IN21k_384_bs16_90k.yaml")
    assert large.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == swin_l_queries
    assert large.SOLVER.MAX_ITER == 90000 and tuple(large.INPUT.CROP.SIZE) == (512, 1024)


KMAX_BACKBONES = ["r50", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large"]


def test_kmax_tree_is_complete():
    for dataset in ("coco", "cityscapes", "ade20k"):
        names = sorted(p.name for p in (CONFIGS / dataset / "panoptic-segmentation").glob("kmax_*.yaml"))
        assert names == sorted(f"kmax_{b}.yaml" for b in KMAX_BACKBONES), dataset


@pytest.mark.parametrize("path", KMAX_YAMLS, ids=[str(p.relative_to(CONFIGS)) for p in KMAX_YAMLS])
def test_kmax_config_merges_with_the_shared_recipe(path):
    with open(path) as f:
        yaml.safe_load(f)
    cfg = build_config(str(path))
    kmax = cfg.MODEL.KMAX_DEEPLAB
    assert cfg.MODEL.META_ARCHITECTURE == "kMaXDeepLab" and cfg.MODEL.SEM_SEG_HEAD.NAME == "kMaXDeepLabHead"
    assert cfg.INPUT.DATASET_MAPPER_NAME == "kmax_panoptic" and cfg.INPUT.COLOR_AUG_SSD
    assert (kmax.CLASS_WEIGHT, kmax.DICE_WEIGHT, kmax.MASK_WEIGHT, kmax.INSDIS_WEIGHT, kmax.AUX_SEMANTIC_WEIGHT) == (
        3.0, 3.0, 0.3, 1.0, 1.0)
    assert kmax.NO_OBJECT_WEIGHT == 1e-5 and kmax.SHARE_FINAL_MATCHING and kmax.NORM == "SyncBN"
    assert list(kmax.PIXEL_DEC.DEC_LAYERS) == [1, 5, 1, 1] and list(kmax.TRANS_DEC.DEC_LAYERS) == [2, 2, 2]
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.WEIGHT_DECAY == 0.05
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1 and cfg.SOLVER.LR_SCHEDULER_NAME == "TF2WarmupPolyLR"
    assert cfg.SOLVER.WARMUP_ITERS == 5000 and cfg.SOLVER.AMP.ENABLED
    assert cfg.MODEL.PIXEL_MEAN == [127.5] * 3 and cfg.MODEL.PIXEL_STD == [127.5] * 3
    if "convnext" in path.name:
        assert cfg.MODEL.BACKBONE.NAME == "D2ConvNeXt"
    else:
        assert cfg.MODEL.BACKBONE.NAME == "custom_bn_build_resnet_backbone"
        assert (cfg.MODEL.RESNETS.NORM_EPS, cfg.MODEL.RESNETS.NORM_MOMENTUM) == (1e-3, 0.01)


@pytest.mark.parametrize(
    "dataset, batch, iters, lr, size, jitter, queries, drop_path, thresholds, train_set",
    [
        ("coco", 64, 150000, 5e-4, (1281, 1281), (0.2, 2.0), 128, 0.2, (0.7, 0.5, 0.8), "coco_2017_train_panoptic"),
        ("cityscapes", 32, 60000, 3e-4, (1025, 2049), (0.5, 2.0), 256, 0.2, (0.5, 0.3, 0.9),
         "cityscapes_fine_panoptic_train"),
        ("ade20k", 64, 100000, 5e-4, (1281, 1281), (0.5, 2.0), 128, 0.0, (0.4, 0.4, 0.8), "ade20k_panoptic_train"),
    ],
)
def test_kmax_published_recipes(dataset, batch, iters, lr, size, jitter, queries, drop_path, thresholds, train_set):
    cfg = cfg_of(f"{dataset}/panoptic-segmentation/kmax_r50.yaml")
    kmax = cfg.MODEL.KMAX_DEEPLAB
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR) == (batch, iters, lr)
    assert fixed_image_size(cfg) == size and (cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE) == jitter
    assert kmax.TRANS_DEC.NUM_OBJECT_QUERIES == queries and kmax.TRANS_DEC.DROP_PATH_PROB == drop_path
    test = kmax.TEST
    assert (test.CLASS_THRESHOLD_THING, test.CLASS_THRESHOLD_STUFF, test.OVERLAP_THRESHOLD) == thresholds
    assert test.PIXEL_CONFIDENCE_THRESHOLD == 0.4
    assert tuple(cfg.DATASETS.TRAIN) == (train_set,)
    # Cityscapes: the light semantic head with the full cross-entropy, insdis temperature 0.6.
    cityscapes = dataset == "cityscapes"
    assert kmax.USE_AUX_SEMANTIC_DECODER is not cityscapes
    assert (kmax.PIXEL_INSDIS_TEMPERATURE, kmax.AUX_SEMANTIC_SAMPLE_K) == ((0.6, 0) if cityscapes else (1.5, 4096))
    large = cfg_of(f"{dataset}/panoptic-segmentation/kmax_convnext_large.yaml")
    assert list(large.MODEL.CONVNEXT.DIMS) == [192, 384, 768, 1536] and large.MODEL.CONVNEXT.DROP_PATH_RATE == 0.6
    assert large.SOLVER.MAX_ITER == iters


# ---------------------------------------------------------------------------------------------
# StructToken (RockeyCoss/StructToken's ADE20K configs)
# ---------------------------------------------------------------------------------------------
# file stem -> (embed dim, depth, heads, crop, backbone lr, head lr multiplier, pixel mean 127.5)
STRUCT_TOKEN_RECIPES = {
    "structtoken_vit_tiny_cse": (192, 12, 3, 512, 2e-5, 9, False),
    "structtoken_vit_tiny_sse": (192, 12, 3, 512, 2e-5, 9, False),
    "structtoken_vit_tiny_pwe": (192, 12, 3, 512, 2e-5, 9, False),
    "structtoken_vit_small_cse": (384, 12, 6, 512, 2e-5, 8, False),
    "structtoken_vit_small_sse": (384, 12, 6, 512, 2e-5, 8, False),
    "structtoken_vit_small_pwe": (384, 12, 6, 512, 2e-5, 8, False),
    "structtoken_vit_base_cse": (768, 12, 12, 512, 2e-5, 8, False),
    "structtoken_vit_base_sse": (768, 12, 12, 512, 2e-5, 8, True),
    "structtoken_vit_base_pwe": (768, 12, 12, 512, 1e-5, 9, True),
    "structtoken_vit_large_sse": (1024, 24, 16, 640, 2e-5, 6, True),
    "structtoken_vit_large_pwe": (1024, 24, 16, 640, 2e-5, 8, True),
}


def test_struct_token_tree_is_complete():
    by_dataset = {}
    for p in STRUCT_TOKEN_YAMLS:
        if not p.name.startswith("Base-"):
            by_dataset.setdefault(p.relative_to(CONFIGS).parts[0], set()).add(p.stem)
    assert by_dataset.pop("ade20k") == set(STRUCT_TOKEN_RECIPES)
    assert by_dataset == {d: {f"structtoken_vit_base_{h}" for h in ("cse", "sse", "pwe")} for d in STRUCT_TOKEN_DATASETS}


# dataset folder -> (classes, crop, sliding stride, test short side, train / test set, batch, iterations)
STRUCT_TOKEN_DATASETS = {
    "cityscapes": (19, 768, 512, 1024, "cityscapes_fine_sem_seg", ("train", "val"), 8, 80000),
    "coco-stuff-10k": (171, 512, 341, 512, "coco_2017_{}_stuff_10k_sem_seg", ("train", "test"), 16, 40000),
}


@pytest.mark.parametrize("head", ["cse", "sse", "pwe"])
@pytest.mark.parametrize("dataset", sorted(STRUCT_TOKEN_DATASETS))
def test_struct_token_other_datasets(dataset, head):
    """The ADE20K ViT-B model and optimiser of the same head, with the dataset's classes, crop,
    sliding window, data and schedule."""
    classes, crop, stride, test_size, names, splits, batch, iters = STRUCT_TOKEN_DATASETS[dataset]
    cfg = cfg_of(f"{dataset}/semantic-segmentation/structtoken/structtoken_vit_base_{head}.yaml")
    ade = cfg_of(f"ade20k/semantic-segmentation/structtoken/structtoken_vit_base_{head}.yaml")
    for key in ("MODEL.VIT.EMBED_DIM", "MODEL.VIT.DEPTH", "MODEL.STRUCT_TOKEN.BLOCK", "MODEL.PIXEL_MEAN",
                "MODEL.PIXEL_STD", "SOLVER.BASE_LR", "SOLVER.BACKBONE_MULTIPLIER", "SOLVER.OPTIMIZER",
                "SOLVER.WEIGHT_DECAY", "SOLVER.LR_SCHEDULER_NAME", "SOLVER.WARMUP_ITERS", "MODEL.VIT.DROP_PATH_RATE"):
        value = cfg
        ade_value = ade
        for part in key.split("."):
            value, ade_value = getattr(value, part), getattr(ade_value, part)
        assert value == ade_value, key
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == classes
    assert list(cfg.MODEL.VIT.IMG_SIZE) == [crop, crop] == list(cfg.MODEL.STRUCT_TOKEN.IMAGE_SIZE)
    assert tuple(cfg.INPUT.CROP.SIZE) == (crop, crop) and cfg.INPUT.SIZE_DIVISIBILITY == crop
    assert list(cfg.TEST.SLIDING_WINDOW.CROP_SIZE) == [crop, crop] and list(cfg.TEST.SLIDING_WINDOW.STRIDE) == [stride] * 2
    assert cfg.INPUT.MIN_SIZE_TEST == test_size and tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (test_size // 2, test_size * 2)
    train, test = (names.format(s) if "{}" in names else f"{names}_{s}" for s in splits)
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == ((train,), (test,))
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER) == (batch, iters)


def test_struct_token_cityscapes_model_builds():
    """The 768 px ViT grid, token grid, crop and window agree (build_model checks them)."""
    from detectron2.modeling import build_model

    cfg = cfg_of("cityscapes/semantic-segmentation/structtoken/structtoken_vit_base_cse.yaml")
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.backbone.pos_embed.shape == (1, 1 + 48 * 48, 768)


@pytest.mark.parametrize("stem", sorted(STRUCT_TOKEN_RECIPES))
def test_struct_token_ade20k_recipes(stem):
    dim, depth, heads, crop, backbone_lr, head_multiplier, mean_127 = STRUCT_TOKEN_RECIPES[stem]
    with open(CONFIGS / "ade20k/semantic-segmentation/structtoken" / f"{stem}.yaml") as f:
        yaml.safe_load(f)
    cfg = cfg_of(f"ade20k/semantic-segmentation/structtoken/{stem}.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "SlidingWindowSemanticSegmentor"
    assert cfg.TEST.SLIDING_WINDOW.ENABLED
    assert list(cfg.TEST.SLIDING_WINDOW.CROP_SIZE) == [crop, crop]
    assert list(cfg.TEST.SLIDING_WINDOW.STRIDE) == [{512: 341, 640: 426}[crop]] * 2
    assert cfg.MODEL.BACKBONE.NAME == "D2VisionTransformer"
    assert cfg.MODEL.SEM_SEG_HEAD.NAME == "StructTokenHead"
    assert cfg.MODEL.STRUCT_TOKEN.BLOCK == stem.rsplit("_", 1)[1].upper()
    assert (cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS) == (dim, depth, heads)
    assert list(cfg.MODEL.VIT.IMG_SIZE) == [crop, crop] == list(cfg.MODEL.STRUCT_TOKEN.IMAGE_SIZE)
    assert tuple(cfg.INPUT.CROP.SIZE) == (crop, crop) and cfg.INPUT.SIZE_DIVISIBILITY == crop
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150 and cfg.MODEL.STRUCT_TOKEN.NUM_LAYERS == 4
    # lr: the head's is BASE_LR, the backbone's BASE_LR x BACKBONE_MULTIPLIER.
    assert cfg.SOLVER.BASE_LR == pytest.approx(backbone_lr * head_multiplier)
    assert cfg.SOLVER.BASE_LR * cfg.SOLVER.BACKBONE_MULTIPLIER == pytest.approx(backbone_lr, rel=1e-5)
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH) == (
        "ADAMW", 0.01, 160000, 16)
    assert (cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.WARMUP_ITERS) == (1.0, 1500)
    assert set(cfg.SOLVER.WEIGHT_DECAY_EXCLUDE) == {"pos_embed", "cls_token"}
    assert list(cfg.MODEL.PIXEL_MEAN) == ([127.5] * 3 if mean_127 else [123.675, 116.280, 103.530])
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_semantic"
    assert cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 0.75


@pytest.mark.parametrize("path", RESTR_YAMLS, ids=[p.name for p in RESTR_YAMLS])
def test_restr_configs_have_the_official_recipe(path):
    cfg = build_config(str(path))
    assert cfg.MODEL.META_ARCHITECTURE == "ReSTR" and cfg.INPUT.DATASET_MAPPER_NAME == "refer"
    assert cfg.INPUT.IMAGE_SIZE == 480 and cfg.MODEL.VIT.IMG_SIZE == [480, 480] and cfg.MODEL.VIT.FINAL_NORM
    assert (cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.DROP_PATH_RATE) == (768, 12, 0.1)
    assert cfg.MODEL.PIXEL_MEAN == [127.5] * 3 and cfg.MODEL.PIXEL_STD == [127.5] * 3
    assert cfg.MODEL.RESTR.LANGUAGE.NUM_LAYERS == 6 and cfg.MODEL.RESTR.FUSION.NUM_LAYERS == 2
    assert cfg.MODEL.RESTR.PATCH_LOSS_WEIGHT == 0.1 and cfg.MODEL.RESTR.LANGUAGE.MAX_TOKENS == 20
    solver = cfg.SOLVER
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.BACKBONE_MULTIPLIER) == ("ADAMW", 1e-5, 0.1)
    assert solver.WEIGHT_DECAY == solver.WEIGHT_DECAY_NORM == solver.WEIGHT_DECAY_EMBED == 5e-4
    assert (solver.IMS_PER_BATCH, solver.MAX_ITER, solver.WARMUP_ITERS) == (8, 400000, 40000)
    assert solver.LR_SCHEDULER_NAME == "WarmupThenPolyLR" and solver.POLY_LR_POWER == 0.9
    assert not solver.AMP.ENABLED and not solver.CLIP_GRADIENTS.ENABLED
    if not path.name.startswith("Base-"):
        assert cfg.DATASETS.TRAIN and cfg.DATASETS.TEST


@pytest.mark.parametrize("path", LOCA_YAMLS, ids=[str(p.relative_to(CONFIGS)) for p in LOCA_YAMLS])
def test_loca_configs_have_the_official_recipe(path):
    cfg = build_config(str(path))
    steps_per_epoch = 1281167 // 1024
    assert cfg.MODEL.META_ARCHITECTURE == "LOCA" and cfg.INPUT.DATASET_MAPPER_NAME == "loca"
    assert cfg.SOLVER.IMS_PER_BATCH == 1024 and cfg.SOLVER.BASE_LR == 1e-3
    assert cfg.SOLVER.MAX_ITER == 100 * steps_per_epoch and cfg.SOLVER.WARMUP_ITERS == 15 * steps_per_epoch
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR" and cfg.SOLVER.BASE_LR_END == pytest.approx(0.01 * 1e-3)
    assert cfg.SOLVER.WEIGHT_DECAY == 0.1 and cfg.SOLVER.WEIGHT_DECAY_NORM == 0.0
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 1.0
    assert cfg.MODEL.VIT.DROP_PATH_RATE == 0.1 and cfg.MODEL.VIT.PATCH_SIZE == 16 and cfg.MODEL.VIT.FINAL_NORM
    loca, views = cfg.MODEL.LOCA, cfg.INPUT.LOCA
    assert int(loca.REFERENCE_KEEP_RATIO * (views.REFERENCE_SIZE // 16) ** 2) == 39
    assert (loca.PROJECTION_HIDDEN_DIM, loca.PROJECTION_BOTTLENECK_DIM, loca.NUM_PROTOTYPES) == (2048, 256, 4096)
    assert (loca.STUDENT_TEMPERATURE, loca.TEACHER_TEMPERATURE, loca.SINKHORN_ITERATIONS) == (0.1, 0.05, 3)
    assert loca.TEACHER_MOMENTUM == 0.996
    assert (views.QUERY_TOKENS_KEPT, views.NUM_FOCAL_QUERIES, views.FOCAL_SIZE) == (70, 9, 96)
    assert list(views.REFERENCE_SCALE) == [0.32, 1.0] and list(views.FOCAL_SCALE) == [0.05, 0.32]
    sizes = {"base": (768, 12, 12), "small": (384, 12, 6), "large": (1024, 24, 16)}
    for name, (dim, depth, heads) in sizes.items():
        if f"_{name}_" in path.name:
            assert (cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS) == (dim, depth, heads)
