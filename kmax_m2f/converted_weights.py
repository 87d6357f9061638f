"""What the checkpoint converters (tools/convert_*.py) share: check converted tensors against the
model a config builds, and save them for ``MODEL.WEIGHTS``."""
import logging
from collections.abc import Mapping

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

__all__ = ["WeightsMismatch", "save_converted"]

logger = logging.getLogger(__name__)


class WeightsMismatch(ValueError):
    """Converted tensors that the configured model has no place for."""


def save_converted(converted: Mapping[str, torch.Tensor], cfg: CfgNode, output: str, author: str) -> None:
    """Save ``converted`` to ``output`` after checking that every key exists in ``cfg``'s model
    with the same shape (else :class:`WeightsMismatch` listing the first offenders). Model keys
    the file lacks are logged: they keep their initialisation."""
    expected = build_model(cfg).state_dict()
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(k for k in converted if k in expected and converted[k].shape != expected[k].shape)
    if unexpected or mismatched:
        details = [f"  not in the model: {k}" for k in unexpected[:10]]
        details += [f"  {k}: {tuple(converted[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
                    for k in mismatched[:10]]
        raise WeightsMismatch(
            f"{len(unexpected)} unknown keys, {len(mismatched)} shape mismatches (is it the right model size / "
            "head / class count?):\n" + "\n".join(details)
        )
    missing = sorted(set(expected) - set(converted))
    if missing:
        logger.info("%d model keys are not in the file and keep their initialisation, e.g. %s",
                    len(missing), ", ".join(missing[:5]))
    torch.save({"model": dict(converted), "__author__": author}, output)
    logger.info("Wrote %d tensors to %s", len(converted), output)
