"""detectron2's checkpointer with saves that a kill cannot truncate and loads that say what is
wrong with a file."""
import glob
import logging
import os
import pickle
import re
import zipfile
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["Checkpointer", "CheckpointError"]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
# What torch.load / pickle raise on a truncated, corrupt or foreign file.
_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, AttributeError)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or cannot be read; the message names it and the way out."""


def _atomic_write(path: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it to ``path``: the
    rename is atomic, so ``path`` is either the old file or the whole new one."""
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


class Checkpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with:

    - atomic saves: a kill while saving leaves ``model_*.pth.partial``, never a truncated
      ``model_*.pth``, and ``last_checkpoint`` is rewritten the same way after the file is whole;
    - a :class:`CheckpointError` naming the file for a missing, truncated or non-checkpoint
      ``MODEL.WEIGHTS`` or resume file;
    - with ``resume``, a ``last_checkpoint`` naming a missing or unreadable file is an error that
      lists the readable checkpoints, unless ``fall_back_to_readable`` is set: then the newest
      readable ``model_*.pth`` is used, with a warning.
    """

    def __init__(self, *args: Any, fall_back_to_readable: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fall_back_to_readable = fall_back_to_readable

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        _atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT), lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename: str) -> dict[str, Any]:
        if not os.path.isfile(filename):
            raise CheckpointError(f"Checkpoint {filename!r} does not exist: check the path (MODEL.WEIGHTS or {LAST_CHECKPOINT}).")
        try:
            return super()._load_file(filename)
        except _UNREADABLE as e:
            if os.path.getsize(filename) == 0:
                problem = "is empty (0 bytes)"
            elif isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
                problem = "holds objects other than tensors and plain values, which are not loaded for safety"
            else:
                problem = f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            raise CheckpointError(
                f"Checkpoint {filename!r} {problem}. It is truncated (a run stopped while saving), corrupt, or not a "
                f"model file saved by detectron2 / tools/convert_*.py: use another checkpoint or convert the file."
            ) from e

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path):
            # detectron2 would stop on an assert; the same message as for the other bad files.
            self._load_file(path)
        return super().load(path, checkpointables)

    def _log_incompatible_keys(self, incompatible) -> None:
        """detectron2's lists, then one line: how much of the model the file filled, and which
        modules keep their initialisation."""
        super()._log_incompatible_keys(incompatible)
        not_loaded = set(incompatible.missing_keys) | {key for key, _, _ in incompatible.incorrect_shapes}
        if not not_loaded:
            return
        model_keys = list(self.model.state_dict())
        modules: dict[str, int] = {}
        for key in model_keys:
            if key in not_loaded:
                module = ".".join(key.split(".")[:2])
                modules[module] = modules.get(module, 0) + 1
        self.logger.warning(
            "The checkpoint filled %d of the model's %d tensors; not from it (initialised as for training from "
            "scratch): %s.", len(model_keys) - len(not_loaded), len(model_keys),
            ", ".join(f"{module} ({count})" for module, count in modules.items()),
        )

    def _readable_checkpoints(self) -> list[str]:
        """``model_*.pth`` files of save_dir that load, newest (highest iteration, then
        model_final) first."""
        def order(path: str) -> tuple[int, int]:
            match = re.search(r"model_(\d+)\.pth$", path)
            return (1, 0) if path.endswith("model_final.pth") else (0, int(match.group(1)) if match else -1)

        readable = []
        for path in sorted(glob.glob(os.path.join(self.save_dir, "model_*.pth")), key=order, reverse=True):
            try:
                torch.load(path, map_location="cpu")
            except _UNREADABLE:
                continue
            readable.append(path)
        return readable

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        last = self.get_checkpoint_file()
        try:
            # load() reads the file before it changes anything.
            return self.load(last)
        except CheckpointError as e:
            # DetectionCheckpointer.load keeps per-load state that a failed load leaves set.
            self._parsed_url_during_load = None
            readable = self._readable_checkpoints()
            if self.fall_back_to_readable and readable:
                logger.warning("%s Resuming from the newest readable checkpoint instead: %s", e, readable[0])
                return self.load(readable[0])
            choices = (
                f"readable checkpoints there: {', '.join(os.path.basename(p) for p in readable)}; write one of their "
                f"names into {os.path.join(self.save_dir, LAST_CHECKPOINT)}, or resume with --resume-from-readable "
                "to take the newest"
                if readable else "no readable model_*.pth is there"
            )
            raise CheckpointError(
                f"--resume: {os.path.join(self.save_dir, LAST_CHECKPOINT)} names {os.path.basename(last)!r}, which cannot "
                f"be used: {e} ({choices}; or delete {LAST_CHECKPOINT} to start again from MODEL.WEIGHTS)."
            ) from e
