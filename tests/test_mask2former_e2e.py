"""Mask2Former end to end through the public tools, for each task, on the synthetic set."""

import pytest

from .conftest import REPO, run_tool

PANOPTIC = "tests/configs/tiny_maskformer_panoptic.yaml"
TASKS = {
    "panoptic": [],
    "instance": [
        "DATASETS.TRAIN", "('synthetic_instance_train',)", "DATASETS.TEST", "('synthetic_instance_val',)",
        "INPUT.DATASET_MAPPER_NAME", "mask_former_instance", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5",
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False",
    ],
    "semantic": [
        "DATASETS.TRAIN", "('synthetic_sem_seg_train',)", "DATASETS.TEST", "('synthetic_sem_seg_val',)",
        "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic",
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
    ],
}
EXPECTED_METRICS = {
    "panoptic": ["copypaste: Task: panoptic_seg", "copypaste: Task: segm", "copypaste: Task: sem_seg"],
    "instance": ["copypaste: Task: segm"],
    "semantic": ["copypaste: Task: sem_seg"],
}


def _train_net(datasets_dir, output_dir, opts, flags=()):
    args = ["tools/train_net.py", "--config-file", PANOPTIC, *flags, "OUTPUT_DIR", str(output_dir), *opts]
    result = run_tool(args, datasets_dir, REPO)
    return result.stdout + result.stderr


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_eval_resume_and_demo(task, datasets_dir, tmp_path):
    opts = TASKS[task]
    log = _train_net(datasets_dir, tmp_path / "train", opts)
    assert (tmp_path / "train" / "model_final.pth").is_file()
    for metric in EXPECTED_METRICS[task]:
        assert metric in log, f"{metric!r} missing from the training run's evaluation"

    weights = str(tmp_path / "train" / "model_final.pth")
    log = _train_net(datasets_dir, tmp_path / "eval", [*opts, "MODEL.WEIGHTS", weights], flags=["--eval-only"])
    assert "Starting training" not in log
    assert all(metric in log for metric in EXPECTED_METRICS[task])

    resume_dir = tmp_path / "train"
    (resume_dir / "last_checkpoint").write_text("model_0000001.pth")
    log = _train_net(datasets_dir, resume_dir, opts, flags=["--resume"])
    assert "Starting training from iteration 2" in log

    image = datasets_dir / "synthetic" / "val" / "000001.jpg"
    run_tool(["tools/demo.py", "--config-file", PANOPTIC, "--input", str(image), "--output", str(tmp_path / "demo"),
              "--opts", *opts, "MODEL.WEIGHTS", weights], datasets_dir, REPO)
    assert (tmp_path / "demo" / "000001.png").is_file()
