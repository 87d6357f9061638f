"""A sixth system added from outside the package: its own module (registered meta-architecture,
config keys, declared output task) and YAML, trained and evaluated by tools/train_net.py through
KMAX_M2F_SYSTEMS, with no file of kmax_m2f touched."""
import textwrap

import torch

from kmax_m2f.systems import EXTRA_SYSTEMS_VARIABLE

from .conftest import REPO, run_tool

SYSTEM = '''
"""A one-layer semantic segmenter: a 3x3 convolution, ReLU, a 1x1 classifier."""
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from torch import nn
from torch.nn import functional as F


def add_config(cfg):
    cfg.MODEL.TINY_SYSTEM = CN()
    cfg.MODEL.TINY_SYSTEM.HIDDEN_CHANNELS = 4


@META_ARCH_REGISTRY.register()
class TinySystem(nn.Module):
    @configurable
    def __init__(self, *, hidden_channels, num_classes, ignore_value, pixel_mean, pixel_std):
        super().__init__()
        self.features = nn.Conv2d(3, hidden_channels, 3, padding=1)
        self.classifier = nn.Conv2d(hidden_channels, num_classes, 1)
        self.ignore_value = ignore_value
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        return {
            "hidden_channels": cfg.MODEL.TINY_SYSTEM.HIDDEN_CHANNELS,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @classmethod
    def output_tasks(cls, cfg):
        return {"semantic"}

    def forward(self, batched_inputs):
        images = torch.stack([(x["image"] - self.pixel_mean) / self.pixel_std for x in batched_inputs])
        logits = self.classifier(F.relu(self.features(images)))
        if self.training:
            targets = torch.stack([x["sem_seg"] for x in batched_inputs])
            return {"loss_sem_seg": F.cross_entropy(logits, targets, ignore_index=self.ignore_value)}
        return [
            {"sem_seg": sem_seg_postprocess(l, l.shape[-2:], x.get("height", l.shape[-2]), x.get("width", l.shape[-1]))}
            for l, x in zip(logits, batched_inputs)
        ]
'''

CONFIG = """
MODEL:
  META_ARCHITECTURE: "TinySystem"
  DEVICE: "cpu"
  WEIGHTS: ""
  TINY_SYSTEM:
    HIDDEN_CHANNELS: 6
  SEM_SEG_HEAD:
    NUM_CLASSES: 8
    IGNORE_VALUE: 255
DATASETS:
  TRAIN: ("synthetic_sem_seg_train",)
  TEST: ("synthetic_sem_seg_val",)
INPUT:
  DATASET_MAPPER_NAME: "mask_former_semantic"
  MIN_SIZE_TRAIN: (64,)
  MAX_SIZE_TRAIN: 64
  MIN_SIZE_TEST: 64
  MAX_SIZE_TEST: 64
  FORMAT: "RGB"
SOLVER:
  IMS_PER_BATCH: 2
  BASE_LR: 0.01
  MAX_ITER: 4
  WARMUP_ITERS: 0
  CHECKPOINT_PERIOD: 100
DATALOADER:
  NUM_WORKERS: 0
TEST:
  EVAL_PERIOD: 0
"""


def test_a_system_outside_the_package_trains_and_evaluates_through_train_net(datasets_dir, tmp_path, monkeypatch):
    (tmp_path / "tiny_system.py").write_text(textwrap.dedent(SYSTEM))
    (tmp_path / "tiny_system.yaml").write_text(CONFIG)
    args = ["tools/train_net.py", "--config-file", str(tmp_path / "tiny_system.yaml"), "OUTPUT_DIR", str(tmp_path / "out")]

    # Unknown to kmax_m2f until named: its config key does not exist.
    result = run_tool(args, datasets_dir, REPO, check=False)
    assert result.returncode != 0 and "MODEL.TINY_SYSTEM" in result.stdout + result.stderr

    monkeypatch.setenv(EXTRA_SYSTEMS_VARIABLE, "tiny_system")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = run_tool(args, datasets_dir, REPO)
    log = result.stdout + result.stderr
    assert "copypaste: Task: sem_seg" in log  # the evaluator its declared output task selects
    state = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)["model"]
    assert tuple(state["features.weight"].shape) == (6, 3, 3, 3)  # the YAML's TINY_SYSTEM key


def test_a_misspelt_system_module_is_named(datasets_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(EXTRA_SYSTEMS_VARIABLE, "no_such_system_module")
    result = run_tool(["tools/train_net.py", "--help"], datasets_dir, REPO, check=False)
    assert result.returncode != 0
    assert "KMAX_M2F_SYSTEMS names the module 'no_such_system_module'" in result.stderr
