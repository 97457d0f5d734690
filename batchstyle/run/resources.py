"""What a run's workers get: the slots (a device each), threads, memory budgets, the batch size `--batch-size auto`
picks, the stall timeout, the TensorRT shape profile, and the `WorkerSpec`s that carry them.

Decided once, in the parent, before any worker starts: the parent never computes, so it asks a GPU's free memory
from a short-lived process (`devices.free_gpu_memory`) rather than open a CUDA context it would hold all run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from batchstyle.images import output_size
from batchstyle.model.graph import GraphSpec
from batchstyle.model.layout import conv_flops, deepest
from batchstyle.model.memory import batch_that_fits, cpu_budget, lbfgs_history
from batchstyle.model.scales import style_long_side
from batchstyle.model.weights import WeightSource
from batchstyle.run.config import RunConfig
from batchstyle.run.devices import free_gpu_memory, parse_devices
from batchstyle.run.messages import WorkerSpec
from batchstyle.run.plan import Job

Sizes = Mapping[Path, tuple[int, int]]  # image file -> (width, height), as the manifest checked them


# -- slots and their shares of the machine -----------------------------------------------------------------------


def worker_slots(config: RunConfig) -> list[str]:
    """One device name per worker: each device of --devices, --workers-per-device times; "ray" for a Ray run.
    (`RunConfig` has checked the counts and that --spread-tiles goes with neither.)"""
    if config.backend == "ray":
        return ["ray"]
    devices = parse_devices(config.devices)
    if config.spread_tiles:
        return devices[:1]  # the others take tiles (`tile_devices`), not rows
    return [device for device in devices for _ in range(config.workers_per_device)]


def tile_devices(config: RunConfig) -> tuple[str, ...]:
    """The devices beside its own that a --spread-tiles worker deals tiles to."""
    return tuple(parse_devices(config.devices)[1:]) if config.spread_tiles else ()


def threads(slots: Sequence[str]) -> int | None:
    """Worker processes on one machine share its cores: each gets its share, so they do not fight over them (two
    processes with a thread per core each run slower together than one alone). The cores are those this process
    may use (a SLURM or container limit), not the machine's."""
    if len(slots) == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // len(slots))


def memory_budgets(config: RunConfig, slots: Sequence[str]) -> dict[str, int]:
    """Each local slot's memory budget: `--max-memory` as given, else its share of what its device has free (every
    CPU slot shares the machine, GPU slots their GPU). A Ray actor, on a node this process cannot see, asks its own."""
    if config.backend == "ray":
        return {}
    if config.max_memory is not None:
        return {slot: config.max_memory for slot in slots}
    budgets = {}
    cpus = sum(1 for slot in slots if slot == "cpu")
    if cpus:
        budgets["cpu"] = cpu_budget() // cpus
    gpus = [slot for slot in slots if slot.startswith("cuda")]
    for name, free in (free_gpu_memory(gpus) if gpus else {}).items():
        budgets[name] = free // slots.count(name)
    return budgets


def auto_batch_size(
    slots: Sequence[str], budgets: Mapping[str, int], jobs: Sequence[Job], sizes: Sizes, arch: str
) -> int:
    """On CUDA, as many images as the smallest slot's budget holds untiled (`memory.batch_that_fits`, the model the
    worker tiles by, so a batch never makes its rows tile); on CPU 1, because a CPU is busy with one image already
    and a batch there only delays every output in it (see `batchstyle bench iteration --batch`)."""
    if not slots or not all(slot.startswith("cuda") and slot in budgets for slot in slots):
        return 1
    budget = min(budgets[slot] for slot in slots)
    fits = []
    for job in jobs:
        if job.row.content in sizes:
            s = job.settings
            w, h = output_size(*sizes[job.row.content], s.size)
            pairs = lbfgs_history(3 * w * h) if s.optimizer == "lbfgs" else 0
            # faces=auto may find a face: its content weights are counted as a content mask's, before it is found
            regions = len(s.style_masks) + bool(s.content_mask or s.faces == "auto")
            fits.append(batch_that_fits(budget, arch, s.content_layers, s.style_layers, w, h, pairs, regions))
    return min(fits, default=1)


# -- how long a worker may stay silent -----------------------------------------------------------------------------

# One L-BFGS iteration of vgg16-hed up to relu5_1, one process on the whole of a 2-core CPU (no GPU): 38.5 s at
# 2048x1536 and 1.7 s at 512x384 (docs/benchmarks.md#cost-per-row), i.e. 12.2 and 8.6 s per megapixel: the higher
# figure, rounded up, is the conservative one. A GPU runs the same iteration tens of times faster, so there the
# default is generous.
ITERATION_SECONDS_PER_MEGAPIXEL = 13.0
STALL_BASE_SECONDS = 180.0  # what may precede an iteration: decoding the images, computing a scale's targets
STALL_ITERATIONS = 3  # slowest iterations allowed beyond that


def iteration_seconds(job: Job, sizes: Sizes, arch: str) -> float:
    """A conservative guess at one iteration of the job's last (largest) scale on a small CPU: the per-megapixel
    figure above, scaled by the convolution work of this network, these taps and this size against vgg16 to relu5_1.
    A content whose size was not checked counts as a square of the long side."""
    size = job.scales()[-1][0]
    w, h = output_size(*sizes[job.row.content], size) if job.row.content in sizes else (size, size)
    taps = (*job.settings.content_layers, *job.settings.style_layers)
    reference = conv_flops("vgg16", "relu5_1", 1000, 1000)
    return ITERATION_SECONDS_PER_MEGAPIXEL * conv_flops(arch, deepest(arch, taps), h, w) / reference


def default_stall_timeout(jobs: Sequence[Job], sizes: Sizes, arch: str, batch_size: int = 1, sharing: int = 1) -> float:
    """Seconds a worker holding a batch may go without a sign of life (progress, or a beat between phases) before
    it is taken as hung: STALL_BASE_SECONDS plus STALL_ITERATIONS of the slowest iteration the run expects. A batch
    of N images iterates N times slower; `sharing` workers on one CPU each get that share of its cores."""
    # Rows sharing their settings and content size (most of a large manifest) are one guess: asked per row, the
    # guess was a twentieth of planning 20,000 rows.
    guesses: dict[tuple[int, tuple[int, int] | None], float] = {}
    for job in jobs:
        key = (id(job.settings), sizes.get(job.row.content))
        if key not in guesses:
            guesses[key] = iteration_seconds(job, sizes, arch)
    slowest = max(guesses.values(), default=0.0)
    return STALL_BASE_SECONDS + STALL_ITERATIONS * slowest * max(1, batch_size) * max(1, sharing)


def stall_timeout(
    config: RunConfig, slots: Sequence[str], jobs: Sequence[Job], sizes: Sizes, arch: str, batch_size: int
) -> float | None:
    """The stall timeout this run uses: the one asked for, or the default for its jobs; None when it is off. CPU
    slots of one machine share its cores, so each iterates that many times slower."""
    if config.stall_timeout is not None:
        return config.stall_timeout or None
    sharing = 1 if config.backend == "ray" else sum(1 for slot in slots if slot == "cpu")
    return default_stall_timeout(jobs, sizes, arch, batch_size, sharing)


# -- what each worker is built from -----------------------------------------------------------------------------


def shape_profile(jobs: Sequence[Job], sizes: Sizes) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """One TensorRT shape profile spanning every image the jobs will feed the target graph, at every scale:
    (min, most common, max) as (height, width), so TensorRT builds its engine once rather than per image size."""
    counts: Counter[tuple[int, int]] = Counter()  # not a list of every shape: 200,000 rows made 1.2 million
    for job in jobs:
        for size, _ in job.scales():
            files = [(job.row.content, size)]
            files += [(style, style_long_side(size, job.settings.style_scale)) for style in job.row.styles]
            for file, long_side in files:
                if file in sizes:
                    w, h = output_size(*sizes[file], long_side)
                    counts[h, w] += 1
    if not counts:
        return None
    low = (min(h for h, _ in counts), min(w for _, w in counts))
    high = (max(h for h, _ in counts), max(w for _, w in counts))
    common = max(sorted(counts), key=counts.__getitem__)
    return low, common, high


def worker_specs(
    source: WeightSource,
    config: RunConfig,
    slots: Sequence[str],
    budgets: Mapping[str, int],
    jobs: Sequence[Job],
    sizes: Sizes,
    torch_targets: frozenset[GraphSpec],
    scratch: Path | None = None,
) -> list[WorkerSpec]:
    """One spec per slot: what its worker process is built from (it sees nothing else of the run)."""
    profile = shape_profile(jobs, sizes)
    per_worker = threads(slots)
    specs = []
    for device in slots:
        specs.append(
            WorkerSpec(
                model=source.name,
                cache_dir=config.cache,
                shared_cache=config.cache_url,
                device=device,
                targets=config.targets,
                trt_fp16=config.trt_fp16,
                profile=profile,
                torch_targets=torch_targets,
                save_every=config.save_every,
                precision=config.precision,  # `auto` is measured by each worker on its own device
                threads=per_worker,
                max_memory=budgets.get(device),
                tile=config.tile,
                scratch=scratch,
                tile_devices=tile_devices(config),
            )
        )
    return specs
