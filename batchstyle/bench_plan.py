"""`batchstyle bench plan`: the seconds and memory a run's parent spends on a large manifest before its first row.

Torch-free, like the parent it measures: a run whose target graphs are exported plans without importing torch
(`run.engine`), so that figure is the one a nightly operator meets on every run after a machine's first. The graph
is exported beforehand, in a spawned process, so that the export (which does need torch) is not counted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from batchstyle.manifest import Manifest, read_manifest
from batchstyle.options import option_values
from batchstyle.run.config import RunConfig
from batchstyle.run.engine import run
from batchstyle.run.progress import Silent


@dataclass(frozen=True)
class PlanFigures:
    rows: int
    start_mb: float  # resident memory before reading (the interpreter and the package imported)
    read_seconds: float
    read_peak_mb: float  # the process's peak resident memory while reading the manifest
    plan_seconds: float
    plan_peak_mb: float  # its peak while planning, up to the first row handed out
    torch_imported: bool  # whether planning imported torch (it should not, once the graph is exported)


class _Planned(Exception):
    """Raised by the bench's events at the first row handed out: planning is over, and no row is optimised."""


def _peak_rss_mb(reset: bool = False) -> float:
    """The process's peak resident memory (VmHWM), reset first when asked so that each phase gets its own peak
    (Linux: /proc/self/clear_refs); elsewhere the high-water mark of the whole process (getrusage)."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_manifest(folder: Path, rows: int) -> Path:
    """`rows` rows over four generated contents and two styles (small, so planning is all there is to measure)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(generator.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(folder / f"content{i}.png")
    for k in range(2):
        Image.fromarray(generator.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"style{k}.png")
    path = folder / "plan.csv"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("content,style,output\n")
        handle.writelines(f"content{i % 4}.png,style{i % 2}.png,out/{i:07d}.png\n" for i in range(rows))
    return path


class _StopAtFirstRow(Silent):
    def row_started(self, row: int, output: str, iterations: int) -> None:
        raise _Planned


def _plan(manifest: Manifest, model: str, cache_dir: Path | None) -> None:
    """`run` on the manifest, stopped as it hands out its first row."""
    with contextlib.suppress(_Planned):
        run(manifest, RunConfig(model=model, devices="cpu", cache_dir=cache_dir), _StopAtFirstRow())


def _warm(folder: Path, model: str, cache_dir: Path | None) -> None:
    """Two rows planned in a process of their own: the weights fetched and the graph exported into the cache."""
    _plan(read_manifest(plan_manifest(folder, 2), option_values({}), folder / "out"), model, cache_dir)


def plan_figures(rows: int, folder: Path, model: str = "random", cache_dir: Path | None = None) -> PlanFigures:
    """Seconds and peak memory of reading a `rows`-row manifest, then of `run` up to the moment it hands out its
    first row: the keys, the ledger's rows, the batches and every worker's settings, all decided before any work."""
    warm = multiprocessing.get_context("spawn").Process(target=_warm, args=(folder / "warm", model, cache_dir))
    warm.start()
    warm.join()
    path = plan_manifest(folder, rows)
    start_mb = _peak_rss_mb(reset=True)
    began = time.perf_counter()
    manifest = read_manifest(path, option_values({}), folder / "out")
    read_seconds = time.perf_counter() - began
    read_peak = _peak_rss_mb()
    _peak_rss_mb(reset=True)
    began = time.perf_counter()
    _plan(manifest, model, cache_dir)
    plan_seconds = time.perf_counter() - began
    plan_peak = _peak_rss_mb()
    return PlanFigures(rows, start_mb, read_seconds, read_peak, plan_seconds, plan_peak, "torch" in sys.modules)
