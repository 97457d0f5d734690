"""`batchstyle bench store`: what object storage costs a run, against an S3-protocol store it is given.

    rows photos at --size px and one painting, made here
        -> local: `run --content DIR --style painting --out DIR`, whole (read, plan, stylize, write)
        -> store: the same files under URL/inputs/, `--out URL/out/`, whole (listing, staging every object, the
           ledger in a local folder, each output put in one request)
        alternated, each on fresh outputs and a fresh staging folder (a night's new photos are fetched once), after
        one unmeasured run of each (graph export and precision probe paid there); seconds per row, the median
    plan-rows tiny photos under URL/plan/ (put in parallel, not timed)
        -> the listing, reading them (every object staged: its size and digest) and planning up to the first row
           handed out, each timed

The goal set in issue 23: the store at most 5% more per row than local files at 256 px. It starts no server: give a
store the clients reach (`AWS_ENDPOINT_URL=http://127.0.0.1:PORT` for moto's or MinIO's server), and a URL prefix it
may write under; what it writes there stays (under a name of its own per run).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchstyle.bench import random_image

GOAL = 0.05  # issue 23: the store's cost per row at most 5% over local files'


@dataclass(frozen=True)
class StoreFigures:
    rows: int
    size: int
    iterations: int
    local_seconds: list[float]  # whole runs, one per repeat
    store_seconds: list[float]

    @property
    def local_per_row(self) -> float:
        return statistics.median(self.local_seconds) / self.rows

    @property
    def store_per_row(self) -> float:
        return statistics.median(self.store_seconds) / self.rows

    @property
    def overhead(self) -> float:
        return self.store_per_row / self.local_per_row - 1


@dataclass(frozen=True)
class ListingFigures:
    rows: int
    list_seconds: float  # the prefix listed (find_rows)
    read_seconds: float  # every object staged and checked (read_manifest)
    plan_seconds: float  # keys, ledger rows and batches, up to the first row handed out


class _Planned(Exception):
    """Raised at the first row handed out: planning is over."""


def _put_tree(folder: Path, url: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    files = {f"{path.rstrip('/')}/{file.name}": file.read_bytes() for file in sorted(folder.iterdir())}
    fs.pipe(files)  # s3fs sends them concurrently


def _whole_run(
    contents: str, style: str, out: str, values: dict[str, Any], model: str, cache: Path | None, ledger: Path | None
) -> float:
    """Seconds of one whole folder-form run, from finding the rows to the last output written (or put)."""
    from batchstyle.manifest import read_manifest
    from batchstyle.run.config import RunConfig
    from batchstyle.run.engine import run
    from batchstyle.run.progress import Silent
    from batchstyle.sources import find_rows

    began = time.perf_counter()
    local_out = None if "://" in out else Path(out)
    sources = find_rows([contents], [style], out=local_out)
    manifest = read_manifest(
        sources.label, values, out, source_table=sources.table, ledger_dir=ledger, listed=sources.listed
    )
    summary = run(manifest, RunConfig(model=model, devices="cpu", cache_dir=cache, ledger=ledger), Silent())
    if summary.exit_code != 0 or summary.failed:
        raise RuntimeError(f"the bench's run failed: {summary.failed}")
    return time.perf_counter() - began


def store_figures(
    url: str,
    rows: int = 4,
    size: int = 256,
    iterations: int = 10,
    repeats: int = 3,
    model: str = "random",
    cache: Path | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> StoreFigures:
    """Whole runs of the same rows from local files and from the store, alternated (`say` tells each)."""
    from batchstyle.options import option_values
    from batchstyle.store import STAGING_ENV

    prefix = f"{url.rstrip('/')}/bench-{uuid.uuid4().hex[:8]}"
    generator = torch.Generator().manual_seed(0)
    local: list[float] = []
    stored: list[float] = []
    with tempfile.TemporaryDirectory(prefix="batchstyle-bench-store-") as temp:
        root = Path(temp)
        photos, paintings = root / "photos", root / "paintings"
        photos.mkdir()
        paintings.mkdir()
        for k in range(rows):
            random_image(size, size * 3 // 4, generator).save(photos / f"photo{k}.png")
        random_image(size, size, generator).save(paintings / "painting.png")
        _put_tree(photos, f"{prefix}/photos/")
        _put_tree(paintings, f"{prefix}/paintings/")
        values = option_values({"size": size, "iterations": iterations})
        patch = _Env()
        try:
            for repeat in range(repeats + 1):
                patch.set(STAGING_ENV, str(root / f"staging{repeat}"))
                seconds = _whole_run(
                    str(photos), str(paintings / "painting.png"), str(root / f"out{repeat}"), values, model, cache, None
                )
                if repeat:
                    local.append(seconds)
                say(f"local run {repeat or '(warm-up)'}: {seconds:.2f} s")
                seconds = _whole_run(
                    f"{prefix}/photos/",
                    f"{prefix}/paintings/painting.png",
                    f"{prefix}/out{repeat}/",
                    values,
                    model,
                    cache,
                    root / f"ledger{repeat}",
                )
                if repeat:
                    stored.append(seconds)
                say(f"store run {repeat or '(warm-up)'}: {seconds:.2f} s")
        finally:
            patch.undo()
    return StoreFigures(rows, size, iterations, local, stored)


def listing_figures(url: str, rows: int = 10_000, model: str = "random", cache: Path | None = None) -> ListingFigures:
    """The seconds of listing `rows` objects under a prefix, reading them as a run does and planning them."""
    from PIL import Image

    from batchstyle.manifest import read_manifest
    from batchstyle.options import option_values
    from batchstyle.run.config import RunConfig
    from batchstyle.run.engine import run
    from batchstyle.run.progress import Silent
    from batchstyle.sources import find_rows
    from batchstyle.store import STAGING_ENV

    class StopAtFirstRow(Silent):
        def row_started(self, row: int, output: str, iterations: int) -> None:
            raise _Planned

    import fsspec

    prefix = f"{url.rstrip('/')}/bench-plan-{uuid.uuid4().hex[:8]}"
    fs, path = fsspec.core.url_to_fs(prefix)
    generator = torch.Generator().manual_seed(1)
    objects = {}
    for k in range(rows):  # each its own bytes, so each its own digest, as photos are
        buffer = io.BytesIO()
        Image.fromarray((torch.rand(12, 16, 3, generator=generator) * 255).byte().numpy()).save(buffer, "PNG")
        objects[f"{path}/photos/p{k:06d}.png"] = buffer.getvalue()
    buffer = io.BytesIO()
    random_image(40, 40, generator).save(buffer, "PNG")
    objects[f"{path}/painting.png"] = buffer.getvalue()
    for start in range(0, len(objects), 1000):
        fs.pipe(dict(list(objects.items())[start : start + 1000]))
    patch = _Env()
    with tempfile.TemporaryDirectory(prefix="batchstyle-bench-store-") as temp:
        patch.set(STAGING_ENV, str(Path(temp) / "staging"))
        try:
            began = time.perf_counter()
            sources = find_rows([f"{prefix}/photos/"], [f"{prefix}/painting.png"], out=None)
            listed = time.perf_counter()
            manifest = read_manifest(
                sources.label,
                option_values({}),
                f"{prefix}/out/",
                source_table=sources.table,
                ledger_dir=Path(temp) / "ledger",
                listed=sources.listed,
            )
            read = time.perf_counter()
            config = RunConfig(model=model, devices="cpu", cache_dir=cache, ledger=Path(temp) / "ledger")
            with contextlib.suppress(_Planned):
                run(manifest, config, StopAtFirstRow())
            planned = time.perf_counter()
        finally:
            patch.undo()
    if len(sources.table[1]) != rows:
        raise RuntimeError(f"the listing found {len(sources.table[1])} rows, not {rows}")
    return ListingFigures(rows, listed - began, read - listed, planned - read)


class _Env:
    """Environment variables set for the bench and put back after."""

    def __init__(self) -> None:
        self.saved: dict[str, str | None] = {}

    def set(self, name: str, value: str) -> None:
        import os

        self.saved.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def undo(self) -> None:
        import os

        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved.clear()
