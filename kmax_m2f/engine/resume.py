"""What a resumed run needs besides the weights, optimizer and schedule to continue the run it
resumes: the training sampler's position and the random number generators' states."""
import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

__all__ = ["RandomStates", "ResumableTrainingSampler"]

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's :class:`TrainingSampler` (the same infinite shuffled order, shared by the
    processes) that starts ``start`` indices into this process's share of it: a run resumed at
    iteration ``k`` sets ``start = k x images per process`` and sees what the uninterrupted run
    saw from iteration ``k`` on. (With aspect-ratio grouping, the few images waiting in the
    grouping buffers at the checkpoint are the exception.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(super().__iter__(), self.start, None)


class RandomStates:
    """A checkpointable holding Python's, NumPy's and PyTorch's global random states, so that a
    resumed single-process run draws the same random numbers (dropout, stochastic depth,
    sampling in the losses) as the uninterrupted one. In a multi-process run every process has
    its own states and only the main one's are saved: they are not restored there."""

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        states = {
            "python": random.getstate(),
            # The NumPy state as plain values and a tensor: loadable with weights_only.
            "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
            "torch": torch.get_rng_state(),
            "world_size": comm.get_world_size(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def load_state_dict(self, states: dict[str, Any]) -> None:
        if states.get("world_size") != 1 or comm.get_world_size() != 1:
            logger.info("Random states are restored for single-process runs only; this one keeps its seeds.")
            return
        random.setstate(states["python"])
        kind, keys, *rest = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
