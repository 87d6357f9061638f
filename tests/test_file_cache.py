"""``DATALOADER.DECODED_FILE_CACHE_MB``: the decoded-file cache and the mappers that use it."""

import copy

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.env import seed_all_rng

import kmax_m2f
from kmax_m2f.data import build_mapper
from kmax_m2f.data.file_cache import MIB, DecodedFileCache
from kmax_m2f.data.mappers import common as mapper_common

NUM_CLASSES = 8  # synthetic categories


def array(nbytes: int, value: int = 0) -> np.ndarray:
    return np.full(nbytes, value, dtype=np.uint8)


def test_cache_reads_once_and_hands_out_read_only_arrays():
    cache = DecodedFileCache(100)
    reads = []

    def read():
        reads.append(1)
        return array(10, 7)

    first = cache.get("a", read)
    second = cache.get("a", read)
    assert len(reads) == 1 and second is first
    assert not first.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        first[0] = 1
    assert cache.cached_bytes == 10 and len(cache) == 1


def test_cache_evicts_least_recently_used_past_its_budget():
    cache = DecodedFileCache(30)
    for key in "abc":
        cache.get(key, lambda: array(10))
    cache.get("a", lambda: pytest.fail("'a' is cached"))  # now "b" is the least recently used
    cache.get("d", lambda: array(10))
    assert cache.cached_bytes == 30 and len(cache) == 3
    reread = []
    cache.get("b", lambda: reread.append(1) or array(10))
    assert reread == [1], "'b' was evicted"
    cache.get("a", lambda: pytest.fail("'a' is still cached"))


def test_disabled_cache_and_oversized_arrays_are_read_every_time():
    for cache, size in ((DecodedFileCache(0), 1), (DecodedFileCache(5), 10)):
        reads = []
        for _ in range(2):
            result = cache.get("a", lambda: reads.append(1) or array(size))
            assert result.flags.writeable, "uncached arrays stay the caller's own"
        assert len(reads) == 2 and len(cache) == 0 and cache.cached_bytes == 0


def test_config_key_defaults_to_off():
    cfg = kmax_m2f.build_config()
    assert cfg.DATALOADER.DECODED_FILE_CACHE_MB == 0


# ---------------------------------------------------------------------------------------------
# The mappers
# ---------------------------------------------------------------------------------------------
def mapper_cfg(prefix: str, mapper_name: str, dataset_kind: str, cache_mb: int):
    cfg = kmax_m2f.build_config()
    cfg.defrost()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DATASET_MAPPER_NAME = mapper_name
    cfg.INPUT.MIN_SIZE_TRAIN = (48, 64, 80)
    cfg.INPUT.MAX_SIZE_TRAIN = 80
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.IMAGE_SIZE = 65
    cfg.INPUT.MIN_SCALE = 0.5
    cfg.INPUT.MAX_SCALE = 1.5
    cfg.DATASETS.TRAIN = (f"{prefix}_{dataset_kind}_train",)
    cfg.DATALOADER.DECODED_FILE_CACHE_MB = cache_mb
    return cfg


def tensors_of(output: dict) -> dict[str, torch.Tensor]:
    fields = {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}
    fields.update({f"instances.{k}": v for k, v in output["instances"].get_fields().items()})
    return fields


@pytest.mark.parametrize(
    "mapper_name, dataset_kind, files_per_record",
    [
        ("kmax_panoptic", "panoptic", 2),  # image + panoptic PNG
        ("mask_former_panoptic", "panoptic", 3),  # image + panoptic PNG + semantic PNG
        ("mask_former_semantic", "sem_seg", 2),  # image + semantic PNG
        ("mask_former_instance", "instance", 1),  # image (labels are in the JSON)
    ],
)
def test_cached_mapper_gives_the_same_samples_and_reads_each_file_once(
    synthetic_prefix, monkeypatch, mapper_name, dataset_kind, files_per_record
):
    records = DatasetCatalog.get(f"{synthetic_prefix}_{dataset_kind}_train")[:4]
    reads = []

    def counting(read):
        def counting_read(path, *args, **kwargs):
            reads.append(path)
            return read(path, *args, **kwargs)

        return counting_read

    # Label files go through detectron2's reader, images through this package's (8-bit scaling).
    monkeypatch.setattr(utils, "read_image", counting(utils.read_image))
    monkeypatch.setattr(mapper_common, "read_image_file", counting(mapper_common.read_image_file))
    outputs = {}
    for cache_mb in (0, 64):
        mapper = build_mapper(mapper_cfg(synthetic_prefix, mapper_name, dataset_kind, cache_mb))
        # kmax_panoptic draws copy-paste partners from the whole training set: its own reads
        # are counted on the main records' files only.
        main_files = {
            r.get(key) for r in records for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name")
        } - {None}
        reads.clear()
        seed_all_rng(5)
        outputs[cache_mb] = [mapper(copy.deepcopy(r)) for r in records * 3]
        main_reads = [path for path in reads if path in main_files]
        if cache_mb:
            assert len(main_reads) == files_per_record * len(records), "each file decoded once"
            assert len(set(main_reads)) == len(main_reads)
        else:
            assert len(main_reads) >= 3 * files_per_record * len(records)
    for uncached, cached in zip(outputs[0], outputs[64]):
        expected, actual = tensors_of(uncached), tensors_of(cached)
        assert expected.keys() == actual.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensor, actual[key]), key
        assert actual["image"].numpy().flags.writeable, "samples do not share the cache's memory"


def test_cache_budget_is_per_mapper_and_in_mib(synthetic_prefix):
    mapper = build_mapper(mapper_cfg(synthetic_prefix, "kmax_panoptic", "panoptic", 3))
    assert mapper.file_cache.max_bytes == 3 * MIB
    for record in DatasetCatalog.get(f"{synthetic_prefix}_panoptic_train"):
        mapper(copy.deepcopy(record))
    assert 0 < mapper.file_cache.cached_bytes <= 3 * MIB
