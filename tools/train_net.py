#!/usr/bin/env python3
"""Train or evaluate any kmax_m2f model with detectron2's tools.

    python tools/train_net.py --config-file configs/... [--num-gpus N] [KEY VALUE ...]
    python tools/train_net.py --config-file configs/... --eval-only MODEL.WEIGHTS model.pth
    python tools/train_net.py --config-file configs/... --resume          # continue from last_checkpoint
    # several machines: --num-machines M --machine-rank R --dist-url tcp://HOST:PORT

``--num-gpus`` is the number of processes per machine; on a machine without GPUs each process
trains on the CPU (gloo backend). SIGTERM or SIGINT to this process stops every process it
started.
"""
import logging
import os
import sys

import torch
import kmax_m2f  # first: it silences a warning detectron2's imports would print
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from kmax_m2f.config import ConfigError
from kmax_m2f.data.datasets.checks import DatasetError
from kmax_m2f.engine import Checkpointer, CheckpointError, Trainer, launch


def setup(args):
    try:
        cfg = kmax_m2f.build_config(args.config_file, args.opts)
    except ConfigError as e:
        # One line that names the bad key and the file, rather than a traceback.
        sys.exit(f"train_net.py: {e}")
    cfg.freeze()
    _require_writable_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Each CPU process would otherwise start one thread per core: N processes, N x oversubscribed.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="kmax_m2f")
    return cfg


def _require_writable_output_dir(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
        if not os.access(output_dir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        sys.exit(f"train_net.py: OUTPUT_DIR {output_dir!r} cannot be created or written ({e.strerror}): give another "
                 "with OUTPUT_DIR path/to/folder.")


def main(args):
    try:
        return _main(args)
    except (DatasetError, CheckpointError, ConfigError) as e:
        if args.debug:
            raise
        sys.exit(f"train_net.py: {_last_line(e)}")


def _last_line(error: Exception) -> str:
    """The message of ``error``; of the original error when a data-loader worker raised it (the
    worker's traceback is then part of the message)."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


def _main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = Checkpointer(model, save_dir=cfg.OUTPUT_DIR, fall_back_to_readable=args.resume_from_readable)
        if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.has_checkpoint()):
            untrained = "--eval-only with an empty MODEL.WEIGHTS evaluates an untrained model (random weights)"
            if not args.allow_random_weights:
                sys.exit(
                    f"train_net.py: {untrained}: give MODEL.WEIGHTS path/to/model.pth (or --resume with a "
                    "checkpoint in OUTPUT_DIR), or --allow-random-weights to evaluate it anyway."
                )
            logging.getLogger("kmax_m2f").warning("%s.", untrained)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.checkpointer.fall_back_to_readable = args.resume_from_readable
    trainer.resume_or_load(resume=args.resume)
    if not args.debug:
        # detectron2 logs the traceback of any training error; a diverged loss or bad data gets one line instead.
        logging.getLogger("detectron2.engine.train_loop").addFilter(_not_a_user_error)
    try:
        return trainer.train()
    except FloatingPointError as e:
        if args.debug:
            raise
        sys.exit(
            f"train_net.py: {str(e).splitlines()[0]} Training diverged: lower SOLVER.BASE_LR, or enable gradient "
            "clipping (SOLVER.CLIP_GRADIENTS.ENABLED True); --debug shows the traceback."
        )


def _not_a_user_error(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], (FloatingPointError, DatasetError, ConfigError)))


if __name__ == "__main__":
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--allow-random-weights", action="store_true",
        help="with --eval-only and no MODEL.WEIGHTS: evaluate the untrained model instead of refusing",
    )
    parser.add_argument(
        "--resume-from-readable", action="store_true",
        help="with --resume: if last_checkpoint names a missing or unreadable file, resume from the newest "
             "readable model_*.pth in OUTPUT_DIR instead of stopping",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of bad data, a bad checkpoint file or a diverged (NaN) loss")
    args = parser.parse_args()
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
