"""Faults a user or a job scheduler causes: stopping a multi-process run, resuming, killed saves."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from .conftest import REPO

TINY_CONFIG = "tests/configs/tiny_sem_seg_fpn.yaml"


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_launcher_stops_every_process(datasets_dir, tmp_path, signum):
    """A real 2-process CPU run with a data-loader worker per rank: the signal goes to the
    launcher alone (as a scheduler's preemption does), and nothing it started survives."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    command = [sys.executable, "tools/train_net.py", "--config-file", TINY_CONFIG, "--num-gpus", "2",
               "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "100000", "DATALOADER.NUM_WORKERS", "1",
               "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0"]
    stderr_file = tmp_path / "stderr.txt"  # a file, not a pipe: nobody reads it while the run goes on
    with open(stderr_file, "w") as stderr_sink:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr_sink,
                                    start_new_session=True)
    try:
        log = tmp_path / "log.txt"
        _wait_for(lambda: log.is_file() and "Starting training" in log.read_text(), 120, "training to start")
        started = psutil.Process(launcher.pid).children(recursive=True)
        assert len(started) >= 4  # 2 ranks, their data loaders, the resource tracker
        os.kill(launcher.pid, signum)
        assert launcher.wait(timeout=30) == 128 + signum
        assert f"{signal.Signals(signum).name} received: stopping the 2 worker processes" in stderr_file.read_text()
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, f"still running: {[p.cmdline() for p in alive]}"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def test_workers_stop_when_the_launcher_is_killed(datasets_dir, tmp_path):
    """SIGKILL cannot be handled: the workers learn of the launcher's death from the kernel."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_dir), OMP_NUM_THREADS="1")
    command = [sys.executable, "tools/train_net.py", "--config-file", TINY_CONFIG, "--num-gpus", "2",
               "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "100000", "DATALOADER.NUM_WORKERS", "0",
               "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0"]
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        log = tmp_path / "log.txt"
        _wait_for(lambda: log.is_file() and "Starting training" in log.read_text(), 120, "training to start")
        started = psutil.Process(launcher.pid).children(recursive=True)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, f"still running: {[p.cmdline() for p in alive]}"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic saves, unreadable files named
def _checkpointer(tmp_path, **kwargs):
    import torch

    from kmax_m2f.engine import Checkpointer

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    return Checkpointer(model, save_dir=str(tmp_path), **kwargs), model


def test_a_save_stopped_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    import torch

    from kmax_m2f.engine import checkpoint as checkpoint_module

    checkpointer, _ = _checkpointer(tmp_path)
    checkpointer.save("model_0000001", iteration=1)
    real_save = torch.save

    def killed_while_writing(data, f):
        real_save(data, f)
        f.truncate(100)  # half-written ...
        raise KeyboardInterrupt  # ... when the process was stopped

    monkeypatch.setattr(checkpoint_module.torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002", iteration=2)
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 1


def test_resume_from_an_unreadable_last_checkpoint_names_it_and_falls_back_only_when_asked(tmp_path):
    from kmax_m2f.engine import CheckpointError

    checkpointer, _ = _checkpointer(tmp_path)
    checkpointer.save("model_0000001", iteration=1)
    checkpointer.save("model_0000003", iteration=3)
    checkpointer.save("model_0000005", iteration=5)
    data = (tmp_path / "model_0000005.pth").read_bytes()
    (tmp_path / "model_0000005.pth").write_bytes(data[: len(data) // 2])  # truncated by a crash of the disk
    with pytest.raises(CheckpointError) as error:
        checkpointer.resume_or_load("", resume=True)
    message = str(error.value)
    assert "last_checkpoint names 'model_0000005.pth'" in message and "truncated" in message
    assert "model_0000003.pth, model_0000001.pth" in message and "--resume-from-readable" in message
    fallback, _ = _checkpointer(tmp_path, fall_back_to_readable=True)
    assert fallback.resume_or_load("", resume=True)["iteration"] == 3

    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")  # deleted since
    with pytest.raises(CheckpointError, match="model_0000009.pth.*does not exist"):
        checkpointer.resume_or_load("", resume=True)


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (b"I am a text file, not a checkpoint\n", "cannot be read"),
    (None, "does not exist"),
])
def test_bad_model_weights_are_named_in_one_line(datasets_dir, tmp_path, content, problem):
    from .conftest import run_tool

    weights = tmp_path / "weights.pth"
    if content is not None:
        weights.write_bytes(content)
    result = run_tool(["tools/train_net.py", "--config-file", TINY_CONFIG, "--eval-only", "MODEL.WEIGHTS", str(weights),
                       "OUTPUT_DIR", str(tmp_path / "out")], datasets_dir, REPO, check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train_net.py: Checkpoint") and str(weights) in last_line and problem in last_line
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr


def test_a_partial_load_is_summarised_in_one_line(tmp_path, caplog):
    import logging

    import torch

    from kmax_m2f.engine import Checkpointer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    partial = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with caplog.at_level(logging.WARNING):
        Checkpointer(model).load(str(tmp_path / "partial.pth"))
    assert "The checkpoint filled 2 of the model's 4 tensors; not from it (initialised as for training from scratch): " \
           "1.0 (2)." in caplog.text
