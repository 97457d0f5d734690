"""The one way a `Stylizer` is built: for a run's worker (`run.worker.Worker.build`) and for the Python facade
(`api.StyleTransfer`) alike.

The facade promises a one-row run's pixels, and everything a stylizer is built from can change them: the device's
precision switches, where targets come from (ONNX Runtime's and torch's differ in the last bits, which L-BFGS
amplifies), which target cache they are kept in, and the memory budget that decides tiling. So both hosts pass
their settings here and nothing else builds one from parts (`Stylizer.local`, torch targets only, serves the
benchmarks and tests).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from batchstyle.model.cache import TargetCache
from batchstyle.model.graph import GraphSpec
from batchstyle.model.numerics import configure_device
from batchstyle.model.precision import PROBE_SETTINGS, decide
from batchstyle.model.stylize import Stylizer
from batchstyle.model.targets import TargetStore, backend_factory
from batchstyle.model.tiles import MemoryPolicy, default_budget
from batchstyle.model.weights import Weights

Profile = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # TensorRT's (min, opt, max) input shapes


def build_stylizer(
    weights: Weights,
    device: torch.device,
    cache_dir: Path,
    precision: str,
    warn: Callable[[str], None],
    *,
    targets: str = "ort",
    trt_fp16: bool = False,
    export: bool = False,
    profile: Profile | None = None,
    torch_graphs: frozenset[GraphSpec] = frozenset(),
    max_memory: int | None = None,
    tile: int | None = None,
    scratch: Path | None = None,
    tile_devices: Sequence[str] = (),
    shared_cache: str | None = None,
) -> Stylizer:
    """A stylizer on `device`, configured for `precision`: `auto` is decided by timing the trunk here, once per
    machine (`model.precision`; the decision is kept in `cache_dir`), and `warn` says what was measured and chosen,
    and when a precision asked for was measured slower than another. The decision is `stylizer.precision_decision`.

    `targets` "ort" computes targets with ONNX Runtime on graphs exported into `cache_dir` (by the run's parent
    before its workers start, or here on first use with `export`), "torch" with torch; `torch_graphs` failed to
    export and use torch. Targets are kept in the cache in `cache_dir`; where it cannot be opened, `warn` says so and
    every target is computed; with `shared_cache` (a store URL) entries and graphs missing there are fetched from the
    store and new ones put to it. `max_memory` bytes (None: the device's `default_budget`) and `tile` decide tiling, as
    `tiles.MemoryPolicy` says; an L-BFGS history too large for memory goes to `scratch` where that folder exists
    (a Ray node may not see the run's output folder: then the system's temporary folder).
    """
    try:
        cache: TargetCache | None = TargetCache(cache_dir, shared_cache, warn)
    except (OSError, sqlite3.Error) as exc:
        warn(f"no target cache ({exc}): every target is computed")  # a read-only cache costs reuse, never the image
        cache = None
    backends = backend_factory(
        weights,
        device,
        cache_dir,
        targets,
        warn,
        trt_fp16=trt_fp16,
        profile=profile,
        torch_graphs=torch_graphs,
        export=export,
        shared=shared_cache,
    )
    # Part of every cache key: fp16 TensorRT targets never stand in for fp32 ones.
    store = TargetStore(backends, cache, "trt-fp16" if trt_fp16 and targets == "ort" else "fp32", warn)
    budget = max_memory if max_memory is not None else default_budget(device)
    scratch = scratch if scratch is not None and scratch.is_dir() else None
    memory = MemoryPolicy(budget, tile, scratch, tuple(tile_devices))
    stylizer = Stylizer(weights, device, store, "fp32", memory)
    # The probe times the trunk the default options tap, built as every row's is, and kept for the rows that use it.
    decision = decide(weights, device, precision, cache_dir, lambda: stylizer.trunk(PROBE_SETTINGS))
    if decision.measured:
        warn(f"precision: {decision.describe()}")
    if decision.slower:
        warn(
            f"--precision {decision.chosen} runs as asked, but this machine measured it slower than "
            f"{decision.fastest} ({decision.describe()}); --precision auto would run {decision.fastest}"
        )
    configure_device(device, decision.chosen)
    stylizer.precision, stylizer.precision_decision = decision.chosen, decision
    return stylizer
