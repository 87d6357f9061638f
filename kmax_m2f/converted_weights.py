"""What the checkpoint converters (tools/convert_*.py) share: check converted tensors against the
model a config builds, and save them for ``MODEL.WEIGHTS``."""
import logging
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

__all__ = ["WeightsMismatch", "converter_main", "load_checkpoint_file", "save_converted", "vit_pos_grid"]

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


def load_checkpoint_file(path: str) -> Mapping:
    """A ``.safetensors`` file, or anything ``torch.load`` reads without running code (a state
    dict, or one under "model" / "state_dict")."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def vit_pos_grid(cfg: CfgNode) -> tuple[int, int]:
    """The ViT's patch grid, (IMG_SIZE / PATCH_SIZE): what a checkpoint's position embedding is
    resampled to."""
    vit = cfg.MODEL.VIT
    return vit.IMG_SIZE[0] // vit.PATCH_SIZE, vit.IMG_SIZE[1] // vit.PATCH_SIZE


def converter_main(
    argv: Optional[list[str]],
    *,
    tool: str,
    description: str,
    input_help: str,
    convert: Callable[[Mapping, CfgNode], Mapping[str, torch.Tensor]],
) -> int:
    """The command line of a tools/convert_*.py script: ``--config-file`` (the model the weights
    are for), ``--input``, ``--output``, ``--opts``; ``convert(checkpoint, cfg)`` does the
    renaming. Every failure exits with one line naming the script (``tool``) and the file."""
    import argparse
    import sys

    import kmax_m2f
    from kmax_m2f.config import ConfigError

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config-file", required=True, help="the config the weights are for")
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--output", required=True, help="converted .pth for MODEL.WEIGHTS")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = kmax_m2f.build_config(args.config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + args.opts)
    except ConfigError as e:
        sys.exit(f"{tool}: {e}")
    try:
        checkpoint = load_checkpoint_file(args.input)
    except Exception as e:  # torch and safetensors raise several types for unreadable files
        sys.exit(f"{tool}: cannot read {args.input} as a checkpoint ({type(e).__name__}: {e})")
    try:
        save_converted(convert(checkpoint, cfg), cfg, args.output, f"kmax_m2f tools/{tool}")
    except WeightsMismatch as e:
        sys.exit(f"{tool}: {args.input} does not fit the model of {args.config_file}: {e}")
    except ValueError as e:
        sys.exit(f"{tool}: {args.input}: {e}")
    return 0
