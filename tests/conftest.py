import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Small enough to write in about a second, large enough for every class to appear.
SYNTHETIC_KWARGS = dict(num_train=16, num_val=4, size=64, seed=0)


@pytest.fixture(scope="session")
def datasets_dir(tmp_path_factory) -> Path:
    """A $DETECTRON2_DATASETS folder holding a small synthetic dataset at ``synthetic/``."""
    from kmax_m2f.data.synthetic_generator import generate_synthetic_panoptic

    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_panoptic(str(root / "synthetic"), **SYNTHETIC_KWARGS)
    return root


@pytest.fixture(scope="session")
def synthetic_prefix(datasets_dir) -> str:
    """Catalog names ``<prefix>_{panoptic,sem_seg,instance}_{train,val}`` for the test dataset."""
    from kmax_m2f.data.datasets.synthetic import register_synthetic

    prefix = "pytest_synthetic"
    register_synthetic(str(datasets_dir / "synthetic"), prefix=prefix)
    return prefix


def run_tool(args: list[str], datasets_dir: Path, cwd: Path, threads: int = 2, check: bool = True):
    """Run a script of tools/ in a fresh interpreter, as a user would."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS=str(threads))
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def backbone_cfg(backbone_name: str, namespace: str, **keys):
    """A CPU config building ``backbone_name`` with ``MODEL.<namespace>.<KEY> = value`` overrides."""
    import kmax_m2f

    cfg = kmax_m2f.build_config()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone_name
    for key, value in keys.items():
        setattr(cfg.MODEL[namespace], key, value)
    return cfg


@pytest.fixture(scope="session")
def refer_datasets_dir(tmp_path_factory) -> Path:
    """A $DETECTRON2_DATASETS folder with the small synthetic set and its referring set
    (``synthetic/refer``: refs, instances.json, vocabulary.txt), as datasets/prepare_synthetic.py
    writes them."""
    root = tmp_path_factory.mktemp("refer_datasets")
    args = ["--root", str(root / "synthetic"), "--num-train", "16", "--num-val", "4", "--size", "64"]
    subprocess.run([sys.executable, str(REPO / "datasets" / "prepare_synthetic.py"), *args], check=True,
                   capture_output=True)
    return root


@contextmanager
def default_dtype(dtype: torch.dtype):
    """``dtype`` as torch's default dtype inside the block (models built there get it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
