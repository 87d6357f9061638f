"""ReSTR through the public tools, as a user runs them on the synthetic referring set: training,
--eval-only, --resume, tools/demo.py --text, datasets/prepare_refer_vocab.py."""
import json

import pytest
import torch

from .conftest import REPO, run_tool

CONFIG = "configs/synthetic/referring-segmentation/restr_vit_synthetic.yaml"


def _opts(refer_datasets_dir, output_dir) -> list[str]:
    return [
        "MODEL.VIT.IMG_SIZE", "[64, 64]", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "1",
        "MODEL.VIT.NUM_HEADS", "2", "INPUT.IMAGE_SIZE", "64", "MODEL.RESTR.LANGUAGE.NUM_LAYERS", "1",
        "MODEL.RESTR.FUSION.NUM_LAYERS", "1", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "MODEL.RESTR.LANGUAGE.VOCABULARY", str(refer_datasets_dir / "synthetic" / "refer" / "vocabulary.txt"),
        "OUTPUT_DIR", str(output_dir),
    ]


@pytest.fixture(scope="module")
def trained(refer_datasets_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("restr_run")
    result = run_tool(["tools/train_net.py", "--config-file", CONFIG,
                       *_opts(refer_datasets_dir, out), "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"],
                      refer_datasets_dir, REPO)
    return out, result


def test_training_evaluates_on_the_referring_metrics(trained):
    out, result = trained
    assert (out / "model_final.pth").is_file()
    log = result.stdout + result.stderr
    assert "copypaste: oIoU,mIoU,Prec@0.5,Prec@0.6,Prec@0.7,Prec@0.8,Prec@0.9" in log
    metrics = json.loads((out / "metrics.json").read_text().splitlines()[-1])
    assert {"refer/oIoU", "refer/mIoU", "refer/Prec@0.5"} <= set(metrics)


def test_eval_only_and_resume(trained, refer_datasets_dir, tmp_path):
    out, _ = trained
    result = run_tool(["tools/train_net.py", "--config-file", CONFIG, "--eval-only",
                       *_opts(refer_datasets_dir, out), "MODEL.WEIGHTS", str(out / "model_final.pth")],
                      refer_datasets_dir, REPO)
    assert "copypaste: oIoU" in result.stdout + result.stderr
    # An interrupted run: only the mid-run checkpoint exists in its output folder.
    (tmp_path / "model_0000001.pth").write_bytes((out / "model_0000001.pth").read_bytes())
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    result = run_tool(["tools/train_net.py", "--config-file", CONFIG, "--resume",
                       *_opts(refer_datasets_dir, tmp_path), "SOLVER.MAX_ITER", "4", "DATASETS.TEST", "()"],
                      refer_datasets_dir, REPO)
    assert "Starting training from iteration 2" in result.stdout + result.stderr
    resumed = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert resumed["iteration"] == 3


def test_demo_draws_the_referred_mask(trained, refer_datasets_dir, tmp_path):
    out, _ = trained
    image = str(refer_datasets_dir / "synthetic" / "val" / "000001.jpg")
    base = ["tools/demo.py", "--config-file", CONFIG, "--input", image, "--output", str(tmp_path)]
    weights = ["--opts", *_opts(refer_datasets_dir, out), "MODEL.WEIGHTS", str(out / "model_final.pth")]
    result = run_tool(base + ["--text", "the red circle on the left"] + weights, refer_datasets_dir, REPO)
    assert (tmp_path / "000001.png").is_file()
    assert "not in the model's vocabulary" not in result.stdout + result.stderr
    # Unknown words still run, read as <unk>, and the user is told.
    result = run_tool(base + ["--text", "zorblax quux"] + weights, refer_datasets_dir, REPO)
    assert "2 word(s) of 'zorblax quux' are not in the model's vocabulary" in result.stdout + result.stderr
    result = run_tool(base + weights, refer_datasets_dir, REPO, check=False)
    assert result.returncode != 0 and "is a referring model: give the sentence with --text" in result.stderr
    result = run_tool(base + ["--text", " "] + weights, refer_datasets_dir, REPO, check=False)
    assert result.returncode != 0 and "Empty referring expression" in result.stderr


def test_text_is_refused_for_other_models(datasets_dir, tmp_path):
    result = run_tool(["tools/demo.py", "--config-file", "configs/synthetic/panoptic-segmentation/maskformer2_R18_synthetic.yaml",
                       "--input", str(datasets_dir / "synthetic" / "val" / "000001.jpg"), "--output", str(tmp_path),
                       "--text", "the circle", "--allow-random-weights"], datasets_dir, REPO, check=False)
    assert result.returncode != 0 and "--text is for referring models (ReSTR), not MaskFormer" in result.stderr


def test_prepare_refer_vocab(refer_datasets_dir, tmp_path):
    run_tool(["datasets/prepare_refer_vocab.py", "--dataset", "synthetic_refer_train", "--output",
              str(tmp_path / "vocab.txt")], refer_datasets_dir, REPO)
    words = (tmp_path / "vocab.txt").read_text().split("\n")
    assert words[:3] == ["<pad>", "<unk>", "the"]
    assert (tmp_path / "vocab.txt").read_text() == \
        (refer_datasets_dir / "synthetic" / "refer" / "vocabulary.txt").read_text()
