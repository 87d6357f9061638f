"""tools/train_net.py end to end on CPU: train, --eval-only, --resume, 2 processes vs 1."""
import re

import pytest
import torch

from .conftest import REPO, run_tool

TINY_CONFIG = "tests/configs/tiny_sem_seg_fpn.yaml"


def _train(datasets_dir, output_dir, *opts, flags=(), num_processes=1, threads=2):
    args = ["tools/train_net.py", "--config-file", TINY_CONFIG, "--num-gpus", str(num_processes), *flags]
    return run_tool([*args, "OUTPUT_DIR", str(output_dir), *opts], datasets_dir, REPO, threads=threads)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def trained(datasets_dir, tmp_path_factory):
    """A tiny model trained for 6 iterations (checkpoints at iterations 3 and 6)."""
    output_dir = tmp_path_factory.mktemp("train")
    result = _train(datasets_dir, output_dir)
    return output_dir, result


def test_train_writes_checkpoints_and_evaluates(trained):
    output_dir, result = trained
    assert (output_dir / "model_final.pth").is_file()
    assert (output_dir / "model_0000002.pth").is_file()
    assert (output_dir / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert _state(output_dir / "model_final.pth")["iteration"] == 5
    assert "copypaste: mIoU,fwIoU,mACC,pACC" in result.stderr + result.stdout
    # The semantic results as tables, not detectron2's raw OrderedDict.
    log = result.stderr + result.stdout
    assert "Per class:" in log and re.search(r"\|\s+circle \|", log)
    assert "OrderedDict([('sem_seg'" not in log


def test_eval_only_loads_weights_and_runs_the_evaluator(trained, datasets_dir, tmp_path):
    output_dir, _ = trained
    weights = str(output_dir / "model_final.pth")
    result = _train(datasets_dir, tmp_path, "MODEL.WEIGHTS", weights, flags=["--eval-only"])
    log = result.stderr + result.stdout
    assert "Start training" not in log and "Starting training" not in log
    assert re.search(r"copypaste: \d+\.\d+,\d+\.\d+", log)


def test_resume_continues_from_the_last_checkpoint(trained, datasets_dir, tmp_path):
    output_dir, _ = trained
    # An interrupted run: only the mid-run checkpoint exists in its output folder.
    (tmp_path / "model_0000002.pth").write_bytes((output_dir / "model_0000002.pth").read_bytes())
    (tmp_path / "last_checkpoint").write_text("model_0000002.pth")
    result = _train(datasets_dir, tmp_path, flags=["--resume"])
    log = result.stderr + result.stdout
    assert "Starting training from iteration 3" in log
    resumed, uninterrupted = _state(tmp_path / "model_final.pth"), _state(output_dir / "model_final.pth")
    assert resumed["iteration"] == 5
    scheduler_states = [s["trainer"]["hooks"]["LRScheduler"] for s in (resumed, uninterrupted)]
    assert scheduler_states[0] == scheduler_states[1], "the schedule resumes where it stopped"
    # The same run: the sampler continues where it was (not from the first images again) and the
    # random states come back, so the resumed weights are the uninterrupted run's, bit for bit.
    assert "Training data continues at index 12" in log  # 3 iterations x 4 images
    differing = [k for k in uninterrupted["model"] if not torch.equal(resumed["model"][k], uninterrupted["model"][k])]
    assert not differing, f"{len(differing)} of {len(uninterrupted['model'])} tensors differ, e.g. {differing[:3]}"


def test_two_cpu_processes_match_one_process_on_the_same_global_batch(datasets_dir, tmp_path):
    # SGD keeps the comparison tight: Adam's normalisation magnifies float round-off of tiny
    # gradients, which would hide a real mismatch in a loose tolerance.
    sgd = ["SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.05", "DATASETS.TEST", "()"]
    _train(datasets_dir, tmp_path / "one", *sgd)
    _train(datasets_dir, tmp_path / "two", *sgd, num_processes=2, threads=1)
    one = _state(tmp_path / "one" / "model_final.pth")["model"]
    two = _state(tmp_path / "two" / "model_final.pth")["model"]
    midway = _state(tmp_path / "one" / "model_0000002.pth")["model"]
    assert one.keys() == two.keys()
    moved = max((one[name].float() - midway[name].float()).abs().max().item() for name in one)
    assert moved > 1e-3, "the last iterations must change the parameters for the comparison to mean anything"
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
