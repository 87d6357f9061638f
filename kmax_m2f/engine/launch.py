"""detectron2's ``launch`` that stops the processes it starts when the launcher is stopped.

detectron2 starts one worker process per GPU (or CPU rank) and waits for them; a SIGTERM (a job
scheduler's preemption, ``kill``) or SIGINT sent to the launcher alone ends it and leaves the
workers training as orphans. Here the launcher passes the signal on, and each worker asks the
kernel for a SIGTERM should the launcher die without doing so (SIGKILL). A worker exits on
SIGTERM through the interpreter's normal exit, which terminates its data-loader processes
(left alone, an orphaned data-loader process never exits: it waits to hand over its prefetched
batches). Whatever is still alive after a grace period is killed.
"""
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
from detectron2.engine import launch as detectron2_launch

__all__ = ["launch"]

logger = logging.getLogger(__name__)

# Seconds a worker gets to exit after SIGTERM before it is killed.
GRACE_PERIOD_S = 5.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _terminate_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent exits (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    sys.exit(128 + signum)


def _worker_main(main_func: Callable, launcher_pid: int, *args: Any) -> Any:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _terminate_with_parent()
    if os.getppid() != launcher_pid:
        # The launcher died before the request above could cover it.
        sys.exit(f"The launcher (pid {launcher_pid}) has exited: worker {os.getpid()} stops.")
    return main_func(*args)


def _stop_workers(signum: int, frame: Any) -> None:
    workers = multiprocessing.active_children()
    # The workers and their own children (data loaders); multiprocessing's resource tracker, a
    # child of this process, exits by itself once this process does.
    descendants = []
    for worker in workers:
        try:
            rank_process = psutil.Process(worker.pid)
            descendants += [rank_process, *rank_process.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    logger.warning(
        "%s received: stopping the %d worker processes (rank processes, their data loaders follow).",
        signal.Signals(signum).name, len(workers),
    )
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + GRACE_PERIOD_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    _, alive = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    sys.exit(128 + signum)


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
) -> None:
    """detectron2's :func:`detectron2.engine.launch` (same arguments); with more than one process,
    SIGTERM / SIGINT to this process stop the workers too, and the workers stop if it dies."""
    if num_machines * num_gpus_per_machine <= 1:
        detectron2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args)
        return
    previous = {s: signal.signal(s, _stop_workers) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        detectron2_launch(
            functools.partial(_worker_main, main_func, os.getpid()),
            num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args,
        )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
