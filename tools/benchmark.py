#!/usr/bin/env python3
"""The project's benchmarks: one subcommand per measured component.

    python tools/benchmark.py ms_deform_attn [--device cpu|cuda] [--repeats N] [--threads T]
    python tools/benchmark.py mask2former [--device cpu|cuda] [--repeats N] [--threads T]
    python tools/benchmark.py kmax [--device cpu|cuda] [--repeats N] [--threads T]
    python tools/benchmark.py restr [--device cpu|cuda] [--repeats N] [--threads T]
    python tools/benchmark.py structtoken [--device cpu|cuda] [--repeats N] [--threads T]
    python tools/benchmark.py compare-official --official-root path/to/Mask2Former --official-root path/to/kmax-deeplab \\
        [--cases op-uniform,m2f-inference-800x1333,...] [--rounds R] [--repeats N] [--threads T]
    python tools/benchmark.py optimizer [--repeats N] [--threads T]
    python tools/benchmark.py depthwise [--repeats N] [--threads T]

Each subcommand prints a markdown table (ready for BENCHMARKS.md). Every figure is measured in a
fresh child process, so that one measurement's allocations, caches and thread pools do not leak
into the next:
- time: median over ``--repeats`` calls after ``--warmup`` calls;
- CPU memory: peak resident set size during the first call, minus the resident set size just
  before it (inputs already allocated). That child runs with a fixed glibc mmap threshold, so
  freed temporaries go back to the system instead of hiding later allocations, and resets the
  kernel's peak-RSS counter (/proc/self/clear_refs) just before the call. Where that reset is
  refused, the peak since the child started is used (getrusage ru_maxrss), which can only
  overstate;
- CUDA memory: torch.cuda.max_memory_allocated during the first call, minus the memory allocated
  before it.
"""

import argparse
import collections
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # Run from a checkout without installing the package.
    sys.path.insert(0, str(REPO))

MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Measurement helpers (run inside the child process)


def _current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes(was_reset: bool) -> int:
    if was_reset:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return max_rss if sys.platform == "darwin" else max_rss * 1024


def _call_times(step: Callable[[], object], device: str, repeats: int, warmup: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``step`` in seconds, after ``warmup`` untimed calls."""
    import torch

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        synchronize()
        times.append(time.perf_counter() - start)
        del result
    return times


def _measure_time(step: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    """Median wall time of ``step`` in milliseconds, after ``warmup`` untimed calls."""
    return 1000 * statistics.median(_call_times(step, device, repeats, warmup))


def _first_call_rss(step: Callable[[], object]) -> tuple[int, int, bool]:
    """(resident set size before, peak during) the first call of ``step`` in bytes, and whether
    the peak is exact (see the module docstring)."""
    gc.collect()
    rss_before = _current_rss_bytes()
    exact = _reset_peak_rss()
    step()
    return rss_before, _peak_rss_bytes(exact), exact


def _measure_peak_memory(step: Callable[[], object], device: str) -> tuple[float, bool]:
    """Peak memory of the first call of ``step`` above what was allocated before it, in MiB, and
    whether the figure is exact (see the module docstring)."""
    import torch

    if device == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - memory_before) / MIB, True
    rss_before, peak, exact = _first_call_rss(step)
    return (peak - rss_before) / MIB, exact


def _run_child(command: list[str], threads: int, metric: str) -> dict:
    """Run this script in a fresh process on ``command`` and return the JSON it prints last."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    if metric == "memory":
        # A fixed threshold turns off glibc's dynamic one: large blocks are always mmap'ed and
        # unmapped on free, so the resident set follows the live allocations.
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    completed = subprocess.run(
        [sys.executable, __file__, *command], env=env, capture_output=True, text=True
    )
    if completed.returncode != 0:
        sys.exit(f"benchmark child {command} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _child_options(args: argparse.Namespace) -> list[str]:
    """The subcommand and its shared options, to pass on to :func:`_run_child`."""
    return [args.benchmark, "--device", args.device, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--threads", str(args.threads)]


def _machine_description(device: str, threads: int) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.1f}x" if denominator > 0 else "n/a"


# ---------------------------------------------------------------------------------------------
# ms_deform_attn: the multi-scale deformable attention op at Mask2Former R50 sizes


MS_DEFORM_ATTN_MODES = ("forward", "forward+backward")


def _ms_deform_attn_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--levels",
        default="128x128,64x64,32x32",
        help="HxW per level; default: strides 8/16/32 of a 1024x1024 crop (Mask2Former R50)",
    )
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--points", type=int, default=4)
    # Internal: one measurement, run in a child process.
    parser.add_argument(
        "--measure", nargs=3, metavar=("IMPL", "MODE", "METRIC"), help=argparse.SUPPRESS
    )


def _ms_deform_attn_inputs(args: argparse.Namespace) -> tuple:
    """Inputs of the pixel decoder's encoder: every pixel of every level is a query, its
    reference point is its own centre, and offsets spread a few pixels around it."""
    import torch

    generator = torch.Generator().manual_seed(0)
    levels = [tuple(int(size) for size in level.split("x")) for level in args.levels.split(",")]
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    level_sizes = spatial_shapes.prod(dim=1)
    level_start_index = torch.cumsum(level_sizes, dim=0) - level_sizes
    num_values = int(level_sizes.sum())
    batch, heads, points, num_levels = args.batch, args.heads, args.points, len(levels)

    centres = []
    for height, width in levels:
        ys, xs = torch.meshgrid(
            (torch.arange(height) + 0.5) / height,
            (torch.arange(width) + 0.5) / width,
            indexing="ij",
        )
        centres.append(torch.stack([xs.flatten(), ys.flatten()], dim=-1))
    reference_points = torch.cat(centres)  # [Lq, 2]
    num_queries = reference_points.shape[0]
    pixel_size = 1.0 / spatial_shapes.flip(-1).float()  # (1/W, 1/H) per level
    if getattr(args, "locations", "local") == "uniform":
        # Anywhere in the map, independently: no two queries share cache lines.
        sampling_locations = torch.rand(batch, num_queries, heads, num_levels, points, 2, generator=generator)
    else:
        # Around each query's own pixel, offsets of ~2 pixels (normal, std 2 px): the scale of
        # Deformable DETR's initial offsets (1..4 px along 8 directions), which training keeps local.
        sampling_locations = torch.randn(
            batch, num_queries, heads, num_levels, points, 2, generator=generator
        )
        sampling_locations.mul_(2.0 * pixel_size[:, None, :])
        sampling_locations.add_(reference_points[None, :, None, None, None, :])
    attention_weights = torch.randn(
        batch, num_queries, heads, num_levels * points, generator=generator
    ).softmax(dim=-1)
    attention_weights = attention_weights.view(batch, num_queries, heads, num_levels, points)
    value = torch.randn(batch, num_values, heads, args.head_dim, generator=generator)
    grad_output = torch.randn(batch, num_queries, heads * args.head_dim, generator=generator)
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return tuple(tensor.to(args.device) for tensor in tensors), grad_output.to(args.device)


def _ms_deform_attn_forward_backward(function: Callable, inputs: tuple, grad_output) -> Callable[[], tuple]:
    """A call of the op ``function(value, spatial_shapes, level_start_index, locations, weights)``
    on fresh leaves of ``inputs`` that returns the gradients of value, locations and weights."""
    import torch

    value, spatial_shapes, level_start_index, locations, weights = inputs

    def forward_backward() -> tuple[torch.Tensor, ...]:
        leaves = [tensor.detach().requires_grad_(True) for tensor in (value, locations, weights)]
        output = function(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
        return torch.autograd.grad(output, leaves, grad_output)

    return forward_backward


def _ms_deform_attn_measure(args: argparse.Namespace) -> dict:
    import torch

    from kmax_m2f.layers.ms_deform_attn import MSDeformAttnFunction, ms_deform_attn_reference

    implementation, mode, metric = args.measure
    function = {"kernel": MSDeformAttnFunction.apply, "reference": ms_deform_attn_reference}[
        implementation
    ]
    inputs, grad_output = _ms_deform_attn_inputs(args)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return function(*inputs)

    step = forward if mode == "forward" else _ms_deform_attn_forward_backward(function, inputs, grad_output)
    if metric == "time":
        return {"time_ms": _measure_time(step, args.device, args.repeats, args.warmup)}
    peak_mib, exact = _measure_peak_memory(step, args.device)
    return {"peak_mib": peak_mib, "peak_is_exact": exact}


def _ms_deform_attn_run(args: argparse.Namespace) -> None:
    if args.measure:
        print(json.dumps(_ms_deform_attn_measure(args)))
        return
    import torch

    from kmax_m2f.layers.ms_deform_attn.functions import _load_extension

    extension, import_error = _load_extension()
    if extension is None:
        sys.exit(f"kmax_m2f._C is not built ({import_error}): run `make setup` first")
    if args.device == "cuda" and not (torch.cuda.is_available() and extension.has_cuda()):
        sys.exit("--device cuda needs a visible GPU and kmax_m2f._C built with CUDA")

    forwarded = _child_options(args) + [
        "--batch",
        str(args.batch),
        "--levels",
        args.levels,
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
        "--points",
        str(args.points),
    ]
    results = {}
    for implementation in ("reference", "kernel"):
        for mode in MS_DEFORM_ATTN_MODES:
            print(f"measuring {implementation} {mode} ...", file=sys.stderr)
            results[implementation, mode] = {}
            for metric in ("time", "memory"):
                results[implementation, mode].update(
                    _run_child(
                        forwarded + ["--measure", implementation, mode, metric],
                        args.threads,
                        metric,
                    )
                )

    kernel_name = "CUDA kernel" if args.device == "cuda" else "C++ CPU kernel"
    levels = args.levels.replace(",", ", ")
    queries = sum(
        int(h) * int(w) for h, w in (level.split("x") for level in args.levels.split(","))
    )
    memory_kind = "peak CUDA memory" if args.device == "cuda" else "peak RSS increase"
    print(
        f"MSDeformAttn op, batch {args.batch}, levels {levels}, {args.heads} heads x "
        f"{args.head_dim} channels, {args.points} points, {queries} queries; "
        f"{_machine_description(args.device, args.threads)}; median of {args.repeats}.\n"
    )
    print(
        f"| implementation | forward (ms) | forward+backward (ms) | forward {memory_kind} (MiB) "
        f"| forward+backward {memory_kind} (MiB) |"
    )
    print("|---|---:|---:|---:|---:|")
    names = {"reference": "PyTorch reference (grid_sample)", "kernel": f"kmax_m2f._C {kernel_name}"}
    for implementation, name in names.items():
        row = [results[implementation, mode] for mode in MS_DEFORM_ATTN_MODES]
        print(
            f"| {name} | {row[0]['time_ms']:.1f} | {row[1]['time_ms']:.1f} "
            f"| {row[0]['peak_mib']:.1f} | {row[1]['peak_mib']:.1f} |"
        )
    reference = [results["reference", mode] for mode in MS_DEFORM_ATTN_MODES]
    kernel = [results["kernel", mode] for mode in MS_DEFORM_ATTN_MODES]
    print(
        "| reference / kernel | "
        + " | ".join(_ratio(r["time_ms"], k["time_ms"]) for r, k in zip(reference, kernel))
        + " | "
        + " | ".join(_ratio(r["peak_mib"], k["peak_mib"]) for r, k in zip(reference, kernel))
        + " |"
    )
    if not all(result["peak_is_exact"] for result in results.values()):
        print("\n(peak RSS could not be reset before the call: memory is the peak since start)")


# ---------------------------------------------------------------------------------------------
# mask2former: whole-model inference latency and training step, random weights and inputs

MASK2FORMER_R50 = "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"
MASK2FORMER_SYNTHETIC = "configs/synthetic/panoptic-segmentation/maskformer2_R18_synthetic.yaml"
KMAX_R50 = "configs/coco/panoptic-segmentation/kmax_r50.yaml"
KMAX_SYNTHETIC = "configs/synthetic/panoptic-segmentation/kmax_R18_synthetic.yaml"
RESTR_VIT_B = "configs/refer/restr_vit_base_refcoco_unc.yaml"
RESTR_SYNTHETIC = "configs/synthetic/referring-segmentation/restr_vit_synthetic.yaml"
STRUCT_TOKEN_VIT_B = "configs/ade20k/semantic-segmentation/structtoken/structtoken_vit_base_{}.yaml"
STRUCT_TOKEN_SYNTHETIC = "configs/synthetic/semantic-segmentation/structtoken_vit_synthetic.yaml"
# The official RefCOCO / RefCOCO+ / G-Ref vocabulary size: the word-embedding table measured.
RESTR_VOCABULARY_SIZE = 12112

# (label, config, mode, height, width, batch). kMaX is built for its input size (INPUT.IMAGE_SIZE
# is set to the measured size); its training inputs carry stride-4 ground truth like its mapper's.
MODEL_CASES = {
    "mask2former": [
        ("R50 inference", MASK2FORMER_R50, "inference", 512, 512, 1),
        ("R50 inference", MASK2FORMER_R50, "inference", 800, 1333, 1),
        ("R50 training step, AdamW + clip", MASK2FORMER_R50, "train", 512, 512, 2),
        ("synthetic R18 training step", MASK2FORMER_SYNTHETIC, "train", 256, 256, 8),
    ],
    "kmax": [
        ("R50 inference", KMAX_R50, "inference", 641, 641, 1),
        ("R50 inference", KMAX_R50, "inference", 1281, 1281, 1),
        ("R50 training step, AdamW", KMAX_R50, "train", 641, 641, 2),
        ("R50 training step, AdamW", KMAX_R50, "train", 641, 641, 1),
        ("synthetic R18 training step", KMAX_SYNTHETIC, "train", 128, 128, 8),
    ],
    "restr": [
        ("ViT-B/16 inference", RESTR_VIT_B, "inference", 480, 480, 1),
        ("ViT-B/16 training step, AdamW", RESTR_VIT_B, "train", 480, 480, 2),
        ("synthetic quick-start training step", RESTR_SYNTHETIC, "train", 128, 128, 16),
    ],
    # The ADE20K configs' sliding-window inference: a 512x512 image is one window, a 512x1024 one
    # three (512 apart by 341).
    "structtoken": [
        *((f"ViT-B/16 {head.upper()} inference, {windows}", STRUCT_TOKEN_VIT_B.format(head), "inference", 512, width, 1)
          for windows, width in (("one window", 512), ("3 sliding windows", 1024))
          for head in ("cse", "sse", "pwe")),
        ("ViT-B/16 CSE training step, AdamW", STRUCT_TOKEN_VIT_B.format("cse"), "train", 512, 512, 2),
        ("synthetic quick-start training step", STRUCT_TOKEN_SYNTHETIC, "train", 256, 256, 8),
    ],
}
MODEL_TITLES = {"mask2former": "Mask2Former", "kmax": "kMaX-DeepLab", "restr": "ReSTR", "structtoken": "StructToken"}


def _model_args(parser: argparse.ArgumentParser) -> None:
    # Internal: one measurement, run in a child process.
    parser.add_argument("--measure", nargs=6, metavar=("CONFIG", "MODE", "H", "W", "BATCH", "METRIC"),
                        help=argparse.SUPPRESS)


def _model_batch(
    height: int, width: int, batch: int, num_classes: int, with_targets: bool, target_stride: int = 1
) -> list[dict]:
    """Random images; for training, 10 random rectangular instances of random classes each, their
    masks kept every ``target_stride`` pixels (kMaX: 4) with the matching "sem_seg_gt"."""
    import torch
    from detectron2.structures import Instances

    generator = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        record = {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
                  "height": height, "width": width}
        if with_targets:
            masks = torch.zeros(10, height, width, dtype=torch.bool)
            for mask in masks:
                y0, x0 = (int(v) for v in torch.randint(0, min(height, width) // 2, (2,), generator=generator))
                mask[y0 : y0 + height // 3, x0 : x0 + width // 3] = True
            instances = Instances((height, width))
            instances.gt_classes = torch.randint(0, num_classes, (10,), generator=generator)
            instances.gt_masks = masks[:, ::target_stride, ::target_stride]
            record["instances"] = instances
            if target_stride > 1:
                semantic = torch.full(instances.gt_masks.shape[1:], 255, dtype=torch.int64)
                for label, mask in zip(instances.gt_classes, instances.gt_masks):
                    semantic[mask] = label
                record["sem_seg_gt"] = semantic
        inputs.append(record)
    return inputs


def _semantic_batch(height: int, width: int, batch: int, num_classes: int, with_targets: bool) -> list[dict]:
    """Random images; for training, a "sem_seg" label map of 10 random rectangles of random
    classes over ignored (255) pixels."""
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        record = {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
                  "height": height, "width": width}
        if with_targets:
            label = torch.full((height, width), 255, dtype=torch.int64)
            for _ in range(10):
                y0, x0 = (int(v) for v in torch.randint(0, min(height, width) // 2, (2,), generator=generator))
                label[y0 : y0 + height // 3, x0 : x0 + width // 3] = int(torch.randint(0, num_classes, (1,), generator=generator))
            record["sem_seg"] = label
        inputs.append(record)
    return inputs


def _restr_batch(size: int, batch: int, with_targets: bool) -> list[dict]:
    """Random square images with a 20-word sentence each (the token limit, all <unk>: the cost
    does not depend on the words) and, for training, a random rectangular target mask."""
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        record = {"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator),
                  "sentence": " ".join(["word"] * 20), "image_box": (0, 0, size, size), "height": size, "width": size}
        if with_targets:
            mask = torch.zeros(size, size, dtype=torch.uint8)
            y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=generator))
            mask[y0 : y0 + size // 3, x0 : x0 + size // 3] = 1
            record["ref_mask"] = mask
        inputs.append(record)
    return inputs


def _restr_opts() -> list[str]:
    """A vocabulary of the official size in a temporary file, and random word vectors (no GloVe
    file needed to measure)."""
    import atexit
    import tempfile

    vocabulary = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    atexit.register(os.unlink, vocabulary.name)
    vocabulary.write("\n".join(["<pad>", "<unk>"] + [f"w{i}" for i in range(RESTR_VOCABULARY_SIZE - 2)]) + "\n")
    vocabulary.close()
    return ["MODEL.RESTR.LANGUAGE.VOCABULARY", vocabulary.name, "MODEL.RESTR.LANGUAGE.WORD_VECTORS", ""]


def _build_measured_model(args: argparse.Namespace, config: str, opts: list[str]) -> tuple:
    """(cfg, model) of ``config`` with random weights on ``args.device``."""
    from detectron2.modeling import build_model

    import kmax_m2f

    cfg = kmax_m2f.build_config(str(REPO / config), ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", ""] + opts)
    return cfg, build_model(cfg)


def _model_measure(args: argparse.Namespace) -> dict:
    import torch

    from kmax_m2f.engine import build_optimizer

    config, mode, height, width, batch, metric = args.measure
    height, width, batch = int(height), int(width), int(batch)
    kmax = args.benchmark == "kmax"
    if args.benchmark == "restr":
        cfg, model = _build_measured_model(args, config, _restr_opts())
        inputs = _restr_batch(height, batch, mode == "train")
    elif args.benchmark == "structtoken":
        cfg, model = _build_measured_model(args, config, [])
        inputs = _semantic_batch(height, width, batch, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, mode == "train")
    else:
        cfg, model = _build_measured_model(args, config, ["INPUT.IMAGE_SIZE", f"[{height}, {width}]"] if kmax else [])
        inputs = _model_batch(height, width, batch, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, mode == "train",
                              4 if kmax else 1)
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                return model(inputs)

    else:
        model.train()
        optimizer = build_optimizer(cfg, model)

        def step():
            losses = model(inputs)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()

    if metric == "time":
        return {"time_ms": _measure_time(step, args.device, args.repeats, args.warmup)}
    peak_mib, exact = _measure_peak_memory(step, args.device)
    # The whole process's peak too (model, optimizer state, activations): what a user's machine
    # must hold.
    total_mib = torch.cuda.max_memory_allocated() / MIB if args.device == "cuda" else _peak_rss_bytes(exact) / MIB
    return {"peak_mib": peak_mib, "peak_total_mib": total_mib, "peak_is_exact": exact}


def _model_run(args: argparse.Namespace) -> None:
    if args.measure:
        print(json.dumps(_model_measure(args)))
        return
    common = _child_options(args)
    memory_kind = "peak CUDA memory" if args.device == "cuda" else "peak RSS increase"
    print(f"{MODEL_TITLES[args.benchmark]}, random weights and inputs; {_machine_description(args.device, args.threads)}; "
          f"median of {args.repeats} after {args.warmup} warm-up.\n")
    total_kind = "process peak CUDA memory" if args.device == "cuda" else "process peak RSS"
    print(f"| what | config | input | batch | median s | {memory_kind} (MiB) | {total_kind} (MiB) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for label, config, mode, height, width, batch in MODEL_CASES[args.benchmark]:
        print(f"measuring {label} {height}x{width} ...", file=sys.stderr)
        measured = {}
        for metric in ("time", "memory"):
            measured.update(_run_child(common + ["--measure", config, mode, str(height), str(width), str(batch),
                                                 metric], args.threads, metric))
        print(f"| {label} | {Path(config).name} | {height}x{width} | {batch} | "
              f"{measured['time_ms'] / 1000:.3f} | {measured['peak_mib']:.0f} | {measured['peak_total_mib']:.0f} |")


# ---------------------------------------------------------------------------------------------
# optimizer: PyTorch's default CPU optimizer step against the fused one the trainer uses there

OPTIMIZER_CONFIGS = [MASK2FORMER_SYNTHETIC, KMAX_SYNTHETIC]


def _optimizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--measure", nargs=2, metavar=("CONFIG", "FUSED"), help=argparse.SUPPRESS)


def _optimizer_measure(args: argparse.Namespace) -> dict:
    import torch

    from kmax_m2f.engine import build_optimizer

    config, fused = args.measure
    cfg, model = _build_measured_model(args, config, [])
    optimizer = build_optimizer(cfg, model)
    for group in optimizer.param_groups:
        # None: PyTorch's default step, one parameter at a time on CPU.
        group["fused"] = True if fused == "fused" else None
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    num_tensors = sum(1 for _ in model.parameters())
    return {"time_ms": _measure_time(optimizer.step, "cpu", args.repeats, args.warmup), "tensors": num_tensors}


def _cpu_child_options(args: argparse.Namespace, measure: Callable[[argparse.Namespace], dict]) -> list[str] | None:
    """Start of a CPU-only subcommand: stop on ``--device cuda``; in a measuring child, print
    ``measure(args)`` and return None; in the parent, return the options for its children."""
    if args.device != "cpu":
        sys.exit(f"{args.benchmark} measures the CPU path only (--device cpu)")
    if args.measure:
        print(json.dumps(measure(args)))
        return None
    return _child_options(args)


def _optimizer_run(args: argparse.Namespace) -> None:
    common = _cpu_child_options(args, _optimizer_measure)
    if common is None:
        return
    print(f"Optimizer step of the quick-start models (random gradients); {_machine_description('cpu', args.threads)}; "
          f"median of {args.repeats} after {args.warmup} warm-up; ms.\n")
    print("| config | parameter tensors | default step | fused step | default / fused |")
    print("|---|---:|---:|---:|---:|")
    for config in OPTIMIZER_CONFIGS:
        default, fused = (
            _run_child(common + ["--measure", config, kind], args.threads, "time") for kind in ("default", "fused")
        )
        print(f"| {Path(config).name} | {default['tensors']} | {default['time_ms']:.1f} | {fused['time_ms']:.1f} | "
              f"{_ratio(default['time_ms'], fused['time_ms'])} |")


# ---------------------------------------------------------------------------------------------
# depthwise: kMaX's DepthwiseConv2d (float32 channels-last on small CPU maps) against nn.Conv2d

# [B, C, H, W] inputs of 5x5 depthwise convolutions: the kMaX quick start's (32x32, 16x16) and
# larger maps on both sides of DepthwiseConv2d.CHANNELS_LAST_MAX_PIXELS, up to kMaX R50's at 641.
DEPTHWISE_SHAPES = [
    (8, 64, 32, 32), (8, 64, 16, 16), (1, 64, 32, 32), (2, 256, 41, 41),
    (8, 64, 64, 64), (1, 256, 64, 64), (1, 256, 81, 81), (1, 256, 161, 161),
]


def _depthwise_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--measure", nargs=3, metavar=("SHAPE", "MODULE", "AUTOCAST"), help=argparse.SUPPRESS)


def _depthwise_measure(args: argparse.Namespace) -> dict:
    """Forward + backward (input and weight gradients) of one module on one input shape."""
    import torch
    from torch import nn

    from kmax_m2f.systems.kmax_deeplab.layers import DepthwiseConv2d

    shape, module, autocast = args.measure
    batch, channels, height, width = (int(v) for v in shape.split("x"))
    if module == "DepthwiseConv2d":
        conv = DepthwiseConv2d(channels, 5, padding=2)
    else:
        conv = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
    x = torch.randn(batch, channels, height, width, requires_grad=True)
    output_grad = torch.randn(batch, channels, height, width)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "autocast"):
            # A layer before the convolution, so its input gradient is computed as in a network.
            out = conv(x * 1.0)
        out.float().backward(output_grad)

    return {"time_ms": _measure_time(step, "cpu", args.repeats, args.warmup)}


def _depthwise_run(args: argparse.Namespace) -> None:
    common = _cpu_child_options(args, _depthwise_measure)
    if common is None:
        return
    print(f"5x5 depthwise convolution, forward + backward; {_machine_description('cpu', args.threads)}; "
          f"median of {args.repeats} after {args.warmup} warm-up; ms.\n")
    print("| input | nn.Conv2d float32 | DepthwiseConv2d float32 | nn.Conv2d bfloat16 autocast | "
          "DepthwiseConv2d bfloat16 autocast |")
    print("|---|---:|---:|---:|---:|")
    for shape in DEPTHWISE_SHAPES:
        shape_arg = "x".join(str(v) for v in shape)
        times = [
            _run_child(common + ["--measure", shape_arg, module, autocast], args.threads, "time")["time_ms"]
            for autocast in ("float32", "autocast")
            for module in ("nn.Conv2d", "DepthwiseConv2d")
        ]
        print(f"| {list(shape)} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


# ---------------------------------------------------------------------------------------------
# compare-official: the official implementations and this package in one run, alternating

# The official checkouts' configs of the models this package's R50 configs reproduce.
OFFICIAL_CONFIGS = {
    "mask2former": "configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml",
    "kmax": "configs/coco/panoptic_segmentation/kmax_r50.yaml",
}
OUR_CONFIGS = {"mask2former": MASK2FORMER_R50, "kmax": KMAX_R50}
OFFICIAL_PACKAGES = {"mask2former": "mask2former", "kmax": "kmax_deeplab"}
# name -> (system, what, H, W, batch); "op" cases: MSDeformAttn forward + backward at Mask2Former
# R50's 1024x1024 sizes with the named sampling-location distribution.
COMPARE_CASES = {
    "op-uniform": ("mask2former", "op-uniform", 1024, 1024, 2),
    "op-local": ("mask2former", "op-local", 1024, 1024, 2),
    "m2f-inference-512": ("mask2former", "inference", 512, 512, 1),
    "m2f-inference-800x1333": ("mask2former", "inference", 800, 1333, 1),
    "m2f-train-512-b2": ("mask2former", "train", 512, 512, 2),
    "m2f-train-512-b2-keep-ffn": ("mask2former", "train-keep-ffn", 512, 512, 2),
    "m2f-train-512-b2-checkpoint": ("mask2former", "train-checkpoint", 512, 512, 2),
    "kmax-inference-641": ("kmax", "inference", 641, 641, 1),
    "kmax-inference-1281": ("kmax", "inference", 1281, 1281, 1),
    "kmax-train-641-b2": ("kmax", "train", 641, 641, 2),
    "kmax-train-641-b2-keep-norm-act": ("kmax", "train-keep-norm-act", 641, 641, 2),
    "kmax-train-641-b2-checkpoint": ("kmax", "train-checkpoint", 641, 641, 2),
}
# The memory switches a training case sets on our side (the official code has none of them):
# "train-checkpoint" recomputes whole blocks in backward; "train-keep-ffn" and
# "train-keep-norm-act" keep Mask2Former's encoder FFN activations and kMaX's batch-norm and
# GELU outputs instead of recomputing them (the defaults).
OUR_CASE_OPTS = {
    ("mask2former", "train-checkpoint"): ["MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_ACTIVATION_CHECKPOINT", "True"],
    ("mask2former", "train-keep-ffn"): ["MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_FFN_CHECKPOINT", "False"],
    ("kmax", "train-checkpoint"): ["MODEL.KMAX_DEEPLAB.PIXEL_DEC.ACTIVATION_CHECKPOINT", "True"],
    ("kmax", "train-keep-norm-act"): ["MODEL.KMAX_DEEPLAB.NORM_ACT_CHECKPOINT", "False"],
}


def _compare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--official-root", action="append", default=[], metavar="DIR",
                        help="a checkout of facebookresearch/Mask2Former or bytedance/kmax-deeplab (give both to "
                             "compare both)")
    parser.add_argument("--cases", default=",".join(COMPARE_CASES), help=f"comma-separated, of {', '.join(COMPARE_CASES)}")
    parser.add_argument("--rounds", type=int, default=2, help="fresh process pairs per case, order alternating")
    parser.add_argument("--saved-tensors", action="store_true",
                        help="instead of time and memory: the activations autograd keeps for backward, by module")
    parser.add_argument("--measure", nargs=3, metavar=("SIDE", "CASE", "METRIC"), help=argparse.SUPPRESS)


def _official_root(roots: list[str], system: str) -> str | None:
    package = OFFICIAL_PACKAGES[system]
    return next((root for root in roots if os.path.isdir(os.path.join(root, package))), None)


def _import_official(root: str, system: str):
    """The official package from ``root``, with what cannot run here stood in for by empty
    modules: Mask2Former's compiled MultiScaleDeformableAttention (its MSDeformAttn then takes
    its own PyTorch path) and detectron2._C (COCO evaluation, not used), if missing."""
    import importlib
    import types

    sys.path.insert(0, root)
    for name in ("MultiScaleDeformableAttention", "detectron2._C"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    return importlib.import_module(OFFICIAL_PACKAGES[system])


def _official_model(root: str, system: str, height: int, width: int):
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config

    package = _import_official(root, system)
    cfg = get_cfg()
    add_deeplab_config(cfg)  # as both official train_net.py do
    (package.add_maskformer2_config if system == "mask2former" else package.add_kmax_deeplab_config)(cfg)
    cfg.merge_from_file(os.path.join(root, OFFICIAL_CONFIGS[system]))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    if system == "kmax":
        cfg.INPUT.IMAGE_SIZE = [height, width]
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _compare_step(args: argparse.Namespace, side: str, case: str) -> tuple[Callable[[], object], object]:
    """(the measured call of ``case`` on ``side`` ("official" or "ours"), inputs made; its model,
    None for the op cases)."""
    import torch

    system, what, height, width, batch = COMPARE_CASES[case]
    if what.startswith("op-"):
        op_args = argparse.Namespace(batch=batch, levels=f"{height // 8}x{width // 8},{height // 16}x{width // 16},"
                                     f"{height // 32}x{width // 32}", heads=8, head_dim=32, points=4, device="cpu",
                                     locations=what[len("op-"):])
        inputs, grad_output = _ms_deform_attn_inputs(op_args)
        if side == "official":
            _import_official(_official_root(args.official_root, system), system)
            from mask2former.modeling.pixel_decoder.ops.functions.ms_deform_attn_func import (
                ms_deform_attn_core_pytorch,
            )

            def function(value, shapes, starts, locations, weights):
                return ms_deform_attn_core_pytorch(value, shapes, locations, weights)
        else:
            from kmax_m2f.layers.ms_deform_attn import MSDeformAttnFunction

            function = MSDeformAttnFunction.apply
        return _ms_deform_attn_forward_backward(function, inputs, grad_output), None
    if side == "official":
        cfg, model = _official_model(_official_root(args.official_root, system), system, height, width)
    else:
        opts = ["INPUT.IMAGE_SIZE", f"[{height}, {width}]"] if system == "kmax" else []
        opts += OUR_CASE_OPTS.get((system, what), [])
        cfg, model = _build_measured_model(args, OUR_CONFIGS[system], opts)
    inputs = _model_batch(height, width, batch, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, what != "inference",
                          4 if system == "kmax" else 1)
    if what == "inference":
        model.eval()

        def inference_step():
            with torch.no_grad():
                return model(inputs)

        return inference_step, model
    model.train()
    # The same optimiser on both sides (the official one lives in each project's train_net.py).
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.05)

    def train_step():
        losses = model(inputs)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 0.01)
        optimizer.step()

    return train_step, model


def _saved_tensor_bytes(step: Callable[[], object], model) -> dict[str, int]:
    """Bytes of the distinct tensors autograd keeps for backward during ``step``, by the
    innermost module (named to depth 3, e.g. ``sem_seg_head.pixel_decoder.transformer``) that
    was running when each was saved; parameters are not counted."""
    import torch

    names = {module: name for name, module in model.named_modules()}
    running: list[str] = []
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    by_module: dict[str, int] = collections.defaultdict(int)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in parameters and pointer not in seen:
            seen.add(pointer)
            where = running[-1] if running and running[-1] else "(top level and loss)"
            by_module[".".join(where.split(".")[:3])] += tensor.untyped_storage().nbytes()
        return tensor

    def enter(module: torch.nn.Module, inputs) -> None:
        running.append(names.get(module, running[-1] if running else ""))

    def leave(module: torch.nn.Module, inputs, output) -> None:
        running.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return dict(by_module)


def _compare_measure(args: argparse.Namespace) -> dict:
    """One process's figures: "time" runs warm-ups then timed calls; "memory" one call, whose
    peak RSS (and increase over the RSS before it) it reports; "saved" one call, whose
    activations kept for backward it counts by module."""
    side, case, metric = args.measure
    step, model = _compare_step(args, side, case)
    if metric == "saved":
        return {"saved_bytes": _saved_tensor_bytes(step, model)}
    if metric == "memory":
        rss_before, peak, exact = _first_call_rss(step)
        return {"peak_mib": peak / MIB, "increase_mib": (peak - rss_before) / MIB, "exact": exact}
    return {"times_s": _call_times(step, "cpu", args.repeats, args.warmup)}


def _compare_saved_tensors(common: list[str], cases: list[str], threads: int) -> None:
    """Per case, one process per side: MiB of the tensors autograd keeps for backward, by module."""
    print("MiB of the distinct tensors autograd keeps for backward during one call (parameters not counted), by "
          "the innermost running module named to depth 3; one process per side.")
    for case in cases:
        kept = {side: _run_child(common + ["--measure", side, case, "saved"], threads, "saved")["saved_bytes"]
                for side in ("official", "ours")}
        modules = sorted(set(kept["official"]) | set(kept["ours"]),
                         key=lambda name: -max(kept["official"].get(name, 0), kept["ours"].get(name, 0)))
        print(f"\n{case}\n\n| module | official MiB | ours MiB |\n|---|---:|---:|")
        for name in modules:
            print(f"| {name} | {kept['official'].get(name, 0) / MIB:.1f} | {kept['ours'].get(name, 0) / MIB:.1f} |")
        print(f"| total | {sum(kept['official'].values()) / MIB:.1f} | {sum(kept['ours'].values()) / MIB:.1f} |")


def _compare_run(args: argparse.Namespace) -> None:
    common = _cpu_child_options(args, _compare_measure)
    if common is None:
        return
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = [case for case in cases if case not in COMPARE_CASES]
    if unknown:
        sys.exit(f"compare-official: unknown case(s) {unknown}; known: {', '.join(COMPARE_CASES)}")
    roots = [os.path.abspath(os.path.expanduser(root)) for root in args.official_root]
    missing = sorted({COMPARE_CASES[case][0] for case in cases if _official_root(roots, COMPARE_CASES[case][0]) is None})
    if missing:
        sys.exit(
            "compare-official needs the official code: --official-root DIR for a checkout of "
            + " and of ".join({"mask2former": "facebookresearch/Mask2Former", "kmax": "bytedance/kmax-deeplab"}[m]
                              for m in missing)
            + " (git clone it; nothing is built or installed: Mask2Former's CUDA op is replaced by its own PyTorch "
            "path). The official code needs timm."
        )
    for root in roots:
        common += ["--official-root", root]
    if args.saved_tensors:
        _compare_saved_tensors(common, cases, args.threads)
        return
    print(f"Official implementations and kmax_m2f side by side: each figure from a fresh process, {args.rounds} "
          f"round(s) per case, the two sides alternating; the same inputs, outputs and threads on both; "
          f"{_machine_description('cpu', args.threads)}. Time: {args.repeats} timed calls after {args.warmup} "
          f"warm-up(s) per process, glibc's default allocator. Memory: a process of its own per side and round with "
          f"glibc's mmap threshold fixed (freed blocks return to the system, so the resident set follows the live "
          f"tensors): its peak RSS during the first call, and the increase over the RSS before that call.\n")
    print("| case | official s (min / median / max) | ours s (min / median / max) | official / ours | "
          "official peak RSS MiB (increase) | ours peak RSS MiB (increase) | ours / official peak RSS |")
    print("|---|---|---|---:|---:|---:|---:|")
    for case in cases:
        results = {"official": [], "ours": []}
        for round_index in range(args.rounds):
            order = ("official", "ours") if round_index % 2 == 0 else ("ours", "official")
            for side in order:
                print(f"measuring {case}, {side}, round {round_index + 1} ...", file=sys.stderr)
                run = {}
                for metric in ("time", "memory"):
                    run.update(_run_child(common + ["--measure", side, case, metric], args.threads, metric))
                results[side].append(run)
        summary = {}
        for side, runs in results.items():
            times = sorted(t for run in runs for t in run["times_s"])
            summary[side] = (times[0], statistics.median(times), times[-1],
                             statistics.median(run["peak_mib"] for run in runs),
                             statistics.median(run["increase_mib"] for run in runs))
        official, ours = summary["official"], summary["ours"]
        print(f"| {case} | {official[0]:.3f} / {official[1]:.3f} / {official[2]:.3f} | "
              f"{ours[0]:.3f} / {ours[1]:.3f} / {ours[2]:.3f} | {_ratio(official[1], ours[1])} | "
              f"{official[3]:.0f} ({official[4]:.0f}) | {ours[3]:.0f} ({ours[4]:.0f}) | {ours[3] / official[3]:.2f}x |")


# ---------------------------------------------------------------------------------------------
# Command line

# name -> (help, add its arguments, run it). Later components add their entry here.
SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "ms_deform_attn": (
        "multi-scale deformable attention: native kernel vs PyTorch reference",
        _ms_deform_attn_args,
        _ms_deform_attn_run,
    ),
    "mask2former": (
        "Mask2Former: inference latency and training step (R50, synthetic R18)",
        _model_args,
        _model_run,
    ),
    "kmax": (
        "kMaX-DeepLab: inference latency and training step (R50 at 641 / 1281, synthetic R18)",
        _model_args,
        _model_run,
    ),
    "restr": (
        "ReSTR: ViT-B/16 inference at 480x480 and training step (batch 2), synthetic training step",
        _model_args,
        _model_run,
    ),
    "structtoken": (
        "StructToken: ViT-B/16 CSE / SSE / PWE inference at 512x512 (one window and sliding), training step",
        _model_args,
        _model_run,
    ),
    "compare-official": (
        "the official Mask2Former / kMaX-DeepLab (a local checkout) and this package, side by side in one run",
        _compare_args,
        _compare_run,
    ),
    "optimizer": (
        "CPU optimizer step of the quick-start models: PyTorch's default against the fused step",
        _optimizer_args,
        _optimizer_run,
    ),
    "depthwise": (
        "kMaX's DepthwiseConv2d against nn.Conv2d on the CPU, forward + backward",
        _depthwise_args,
        _depthwise_run,
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text)
        subparser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        subparser.add_argument("--repeats", type=int, default=5, help="timed calls (median)")
        subparser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
        subparser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    args = parser.parse_args(argv)
    if args.measure:
        # A measuring child (see _run_child): its thread count and random weights / inputs.
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
    args.run(args)


if __name__ == "__main__":
    main()
