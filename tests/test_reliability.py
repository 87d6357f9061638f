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
