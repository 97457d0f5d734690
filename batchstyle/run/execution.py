"""The parent's side of a run: the ledger's only writer, reacting to what the pool reports.

A row is marked `running` when its batch is handed out and `done` only after its worker reports the file renamed
into place, so a crash anywhere leaves the ledger saying what is still to do. One failing row is recorded with its
error and never costs other rows their work; a worker that dies, or hangs (silent for the stall timeout), has its rows
handed out again, up to `retries` times, on a fresh worker. A slot whose rows fail SLOT_FAILURES times in a row for
one cause that is not theirs (its worker cannot read the inputs, its device or driver is broken) is taken out of the
run, and those rows go to the other slots. A row that could not be written for want of room stops the run (`DiskFull`):
the disk is full for every row and every slot alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchstyle import store
from batchstyle.errors import RunError, free_space
from batchstyle.images import read_metadata
from batchstyle.model.weights import WeightSource
from batchstyle.run.config import RunConfig
from batchstyle.run.ledger import Ledger, LedgerWriteError, Planned, WorkerState, pack_history
from batchstyle.run.messages import Result
from batchstyle.run.plan import Job
from batchstyle.run.pools import Pool
from batchstyle.run.progress import Events
from batchstyle.run.scheduler import Scheduler
from batchstyle.run.signals import Stop
from batchstyle.video import FRAME_NAME, clip_key, select

if TYPE_CHECKING:
    from batchstyle.run.engine import RunSummary

SLOT_FAILURES = 3  # rows in a row failed with one cause that is not theirs: the slot is taken out of the run
# Seconds between a slot's progress writes to the ledger (rows' iterations, its rate), which is all a separate
# `batchstyle serve` sees of a run: one small commit a second a slot, against rows of seconds to hours.
LIVE_INTERVAL = 1.0


class DiskFull(LedgerWriteError):
    """An output (or its iterates, or a clip's frames) could not be written for want of room: the run stops as it
    does when the ledger cannot be written, with one message, its finished outputs kept and the rows left still to
    do, so that the same command resumes once there is room. Failing the rows instead took the slot out after three
    and failed every row left; a full disk is neither a row's trouble nor its worker's."""


@dataclass
class _Streak:
    """A slot's latest failures for causes not the rows' own, `count` of them in a row with `cause`; their rows are
    held, not yet recorded, until the slot is taken out (they go elsewhere) or does something else (they stand)."""

    cause: str
    count: int = 0  # failed batches (or device faults) in a row
    held: list[tuple[Job, Result]] = field(default_factory=list)


class Execution:
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
        self.full: Path | None = None  # the folder an output found full: no row is handed out after that
        self.live = _Live()

    # PoolEvents
    def progress(self, slot: int, row: int, iteration: int, losses: dict[str, float]) -> None:
        jobs = self.in_flight.get(slot, [])
        if len(jobs) == 1 and (clip := jobs[0].clip) is not None:
            # A clip reports its frames finished; the chunks of one row add up to one bar, in frames.
            job = jobs[0]
            done = self.clip_frames.setdefault(job.output, {})
            if done.get(clip.chunk) != iteration:
                done[clip.chunk] = iteration
                with self.stop.shielded():
                    self.ledger.mark_frames(job.output, sum(done.values()), self.clip_totals[job.output])
            iteration = sum(done.values())
        elif jobs:
            self._progressed(slot, jobs, row, iteration)
        self.events.iteration(row, iteration, losses)

    def _progressed(self, slot: int, jobs: list[Job], row: int, iteration: int) -> None:
        """A row's iterations so far, kept here and written with its slot's rate at most every LIVE_INTERVAL."""
        live, worker = self.live, self.live.workers.get(slot)
        job = next((job for job in jobs if job.row.number == row), None)
        if worker is None or job is None:
            return
        moved = iteration - live.iterations.get(job.output, 0)
        if moved <= 0:
            return
        live.iterations[job.output] = iteration
        worker.iterations += moved
        now = time.monotonic()
        last, counted = live.written.setdefault(slot, (now, worker.iterations - moved))
        if now - last >= LIVE_INTERVAL:
            worker.rate = (worker.iterations - counted) / (now - last)
            live.written[slot] = (now, worker.iterations)
            with self.stop.shielded():
                moving = {job.output: live.iterations[job.output] for job in jobs if job.output in live.iterations}
                self.ledger.write_live(self.run_id, [worker], moving)
                self._count_workers()

    def _worker(self, slot: int, state: str, detail: str | None = None, rows: str = "", settled: int = 0) -> None:
        """The slot's new state, written at once: handed rows, idle again, lost, taken out."""
        worker = self.live.workers.get(slot)
        if worker is None:
            return
        worker.state, worker.detail, worker.rows, worker.since = state, detail, rows, time.time()
        worker.rows_done += settled
        if state != "running":
            worker.rate = None
            self.live.written.pop(slot, None)
        self.ledger.write_live(self.run_id, [worker])
        self._count_workers()

    def _count_workers(self) -> None:
        """The pool's replacements and stall kills, written when they change."""
        if self.pool is None:
            return
        counts = (self.pool.replaced, self.pool.stalls_killed)
        if counts != self.live.counted:
            self.live.counted = counts
            self.ledger.count_workers(self.run_id, *counts)

    def results(self, slot: int, results: list[Result]) -> None:
        with self.stop.shielded():
            jobs = {job.row.number: job for job in self.in_flight.pop(slot, [])}
            self.scheduler.finished(slot)
            self._worker(slot, "idle", settled=len(results))
            results = [_own_if_inputs_gone(jobs[result.row], result) for result in results]
            for result in results:
                if result.full is not None:
                    self._no_room(jobs[result.row], result)
            results = [result for result in results if result.full is None]
            if not results:
                return
            causes = {result.cause for result in results}
            if len(causes) == 1 and (cause := next(iter(causes))) is not None:
                # Every row of the batch failed for one reason not their own: the slot's fault, perhaps.
                self._suspect(slot, cause, [(jobs[result.row], result) for result in results])
                return
            self._settle(slot)
            for result in results:
                self._record(jobs[result.row], result)

    def _no_room(self, job: Job, result: Result) -> None:
        """The row's output found its folder full: the row stays to do, and the run stops handing out rows."""
        self.full = self.full or result.full
        self.summary.interrupted.append(job.row.number)
        self.ledger.mark_finished(job.output, status="pending", error=result.error)
        self.events.row_finished(job.row.number, self.ledger.relative(job.output), "retry", {})

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
        self._worker(slot, "taken out", streak.cause)
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
                    error += f"; its last try: {without_row(job.row.number, self.last_errors[job.output])}"
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
        self._worker(slot, "lost", reason)
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
        now = time.time()
        self.live.workers = {slot: WorkerState(slot, device, since=now) for slot, device in enumerate(pool.slots)}
        with stop.shielded():
            self.ledger.start_workers(self.run_id, list(self.live.workers.values()))
        announced = False
        while True:
            for slot in pool.idle():
                if stop.requested or self.full:
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
            if self.full and not announced:
                announced = True
                pool.drain()  # the rows running finish (or find the disk full too), and the run stops
            if not pool.busy():
                if stop.requested or self.full or not len(self.scheduler):
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
            self._finish_workers()
        if self.full:
            left = len(self.summary.interrupted) + len(self.scheduler.rows())
            raise DiskFull(
                f"no room left in {self.full} ({free_space(self.full)}): the run stopped with {left} row"
                f"{'s' if left != 1 else ''} still to do; free space there or give the run another --out, then run "
                "the same command again: finished outputs are kept and the run resumes"
            )
        self._leave_rest()

    def _hand_out(self, slot: int, batch: list[Job]) -> None:
        device = self._device(slot)
        self.in_flight[slot] = batch
        for job in batch:
            self.live.iterations.pop(job.output, None)
            self.ledger.mark_running(
                job.output,
                run_id=self.run_id,
                device=device,
                model=self.source.name,
                weights=self.source.sha256,
                planned=job.total_iterations if job.clip is None else None,
            )
            if job.clip is None:
                self.events.row_started(job.row.number, self.ledger.relative(job.output), job.total_iterations)
            elif job.output not in self.clip_frames:  # a clip's bar counts frames, lead-ins of every chunk included
                self.clip_frames[job.output] = {}
                self.events.row_started(job.row.number, self.ledger.relative(job.output), self.clip_totals[job.output])
        assert self.pool is not None
        if slot in self.live.workers:
            self.live.workers[slot].device = device  # a Ray actor's name says its node once it is ready
        self._worker(slot, "running", rows=",".join(str(job.row.number) for job in batch))
        self.pool.submit(slot, batch)

    def _record(self, job: Job, result: Result) -> None:
        if job.clip is not None and not self._clip_settled(job, result):
            return
        if job.clip is not None and result.status == "done":
            # Here, not at the top: run.clip is a worker's module (torch), and the parent plans without torch.
            from batchstyle.run.clip import assemble_clip, clip_temporal_error, release_frames

            # With a URL --out, assemble_clip fetches the frames the workers put to the store (a Ray actor's node
            # shares no folder with this one) and puts the clip before it returns: the row is recorded done below,
            # only once its object is there.
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
            finally:
                release_frames(job)
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
            "history": pack_history(result.history) if result.history else None,
        }
        if result.losses is not None:
            fields.update(
                content_loss=result.losses["content"],
                style_loss=result.losses["style"],
                tv_loss=result.losses["tv"],
                total_loss=result.losses.total,
                params=json.dumps(
                    {
                        **job.settings.as_dict(),
                        "scales": [list(x) for x in result.scales],
                        "stops": result.stops,
                        "colours": result.colours,  # per style: what color=auto chose
                        # faces=auto: the faces found, [x, y, w, h] as fractions of the content
                        **({"faces_found": result.faces} if result.faces is not None else {}),
                        "batch": result.batch,
                        **({"frames": result.frames, "temporal_error": result.temporal_error} if job.clip else {}),
                        # per scale [tile px (0: untiled), L-BFGS pairs, their store, devices]: a tile changes pixels
                        # within 1/255 only, so it is recorded, not part of the key
                        "tiling": [list(t) for t in result.tiling],
                        "memory_budget": result.memory_budget,
                        "precision_measured": result.precision_measured,  # what --precision auto timed here
                    }
                ),
            )
        self.ledger.mark_finished(job.output, status=result.status, **fields)
        info = {"seconds": round(result.seconds, 3), "error": result.error}
        if result.losses is not None:
            info.update(result.losses.as_dict())
        self.events.row_finished(job.row.number, self.ledger.relative(job.output), result.status, info)
        if result.status == "done":
            self.summary.done.append(job.row.number)
        else:
            self.summary.failed[job.row.number] = without_row(job.row.number, result.error or "failed")

    def _leave_rest(self) -> None:
        """Rows still queued (a stop was asked for) stay pending; the next run does them. A stop that came when
        nothing was left to start is no stop at all."""
        left = self.scheduler.rows()
        if self.stop.requested and left:
            self.summary.stopped = True
            self.summary.interrupted += left

    def _finish_workers(self) -> None:
        """The run is over: every slot still in it says so."""
        now = time.time()
        finished = [w for w in self.live.workers.values() if w.state != "taken out"]
        for worker in finished:
            worker.state, worker.detail, worker.rows, worker.since, worker.rate = "finished", None, "", now, None
        self.ledger.write_live(self.run_id, finished)
        self._count_workers()

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
        self._finish_workers()


@dataclass
class _Live:
    """What the ledger's live state is written from: each slot's `WorkerState`, the running rows' iterations so far,
    and when each slot's progress was last written (monotonic seconds, and its iterations then)."""

    workers: dict[int, WorkerState] = field(default_factory=dict)
    iterations: dict[Path, int] = field(default_factory=dict)
    written: dict[int, tuple[float, int]] = field(default_factory=dict)
    counted: tuple[int, int] = (0, 0)  # workers replaced and stalls killed, as last written


def _own_if_inputs_gone(job: Job, result: Result) -> Result:
    """A failure the worker took for its slot's (a file it could not read) is the row's own when this process
    cannot read one of the row's inputs either: the file went, or changed hands, after the manifest was checked.
    Three rows whose photos were deleted mid-run took the only CPU slot out, and every later row failed with it."""
    if result.cause is None or all(_readable(path) for path in _inputs(job)):
        return result
    return dataclasses.replace(result, cause=None)


def _inputs(job: Job) -> list[Path]:
    row, settings = job.row, job.settings
    masks = [Path(mask) for mask in settings.style_masks]
    return [row.content, *row.styles, *([row.init_image] if row.init_image else []), *masks] + (
        [Path(settings.content_mask)] if settings.content_mask else []
    )


def _readable(path: Path) -> bool:
    try:
        return os.access(path, os.R_OK)
    except (OSError, ValueError):
        return False


def plan_rows(ledger: Ledger, jobs: Sequence[Job], run_id: int, force: bool = False) -> tuple[list[Job], list[Job]]:
    """(to do, skipped as done), in the jobs' order, recorded in the ledger a batch of rows to a transaction.

    Done: the ledger says so under the job's key and its file is there; or the file carries the job's key in its
    metadata, finished work whose `done` never reached the ledger (a kill between the rename and the ledger write,
    or a lost ledger), recorded rather than redone. Which files are there comes from one listing per folder, not a
    system call per row: a name too long for its folder is then simply not there (its row fails alone when its file
    is written; `is_file` raised and took the whole run down), and 200,000 rows need no 200,000 stats.
    """
    done = {} if force else ledger.done_keys()
    listings: dict[str, frozenset[str]] = {}
    to_do: list[Job] = []
    skipped: list[Job] = []
    seen: list[Path] = []
    finished: list[Job] = []
    for job in jobs:
        if not force and (
            _present(job.output, listings)
            if job.row.output_url is None
            else _stored(job, ledger.relative(job.output), listings)
        ):
            if done.get(ledger.relative(job.output)) == job.key:
                skipped.append(job)
                seen.append(job.output)
                continue
            if _carries_key(job):
                skipped.append(job)
                finished.append(job)
                continue
        to_do.append(job)
    ledger.plan_rows(run_id, map(_planned, to_do), seen, map(_planned, finished))
    return to_do, skipped


def _present(output: Path, listings: dict[str, frozenset[str]]) -> bool:
    folder, name = os.path.split(output)  # strings, not a Path made per row for its folder
    names = listings.get(folder)
    if names is None:
        try:
            names = frozenset(os.listdir(folder or "."))
        except OSError:  # not made yet, or not a folder this system can list: nothing of it is there
            names = frozenset()
        listings[folder] = names
    return name in names and output.is_file()


def _stored(job: Job, name: str, listings: dict[str, frozenset[str]]) -> bool:
    """Whether the row's output (`name` under the --out prefix) is in the store: one listing of the prefix for the
    whole run. A bucket that does not exist or cannot be listed stops the run here, before any work. A clip's
    folder of frames is no object: it is there once its last frame is, the last one put (`run.clip._put_clip`)."""
    url = job.row.output_url
    if url is None or not url.endswith(name):
        return False
    prefix = url[: len(url) - len(name)]
    names = listings.get(prefix)
    if names is None:
        names = listings[prefix] = store.names(prefix)
    if job.clip is not None and not job.output.suffix:
        last = len(select(job.clip.total, job.settings.frame_span(), job.settings.every)) - 1
        return f"{name}/{FRAME_NAME.format(last)}" in names
    return name in names


def _carries_key(job: Job) -> bool:
    """Whether the row's output carries its job key: finished work whose `done` never reached the ledger. A clip's
    video carries it in its container's metadata (`video.clip_key`; not a GIF, whose muxer writes none). A folder
    of frames is never taken for finished this way: its frames are put one by one, so only every frame's key read
    would prove them all this row's; the row runs again, finds every frame finished, and only assembles."""
    url = job.row.output_url
    if job.clip is not None and not job.output.suffix:
        return False
    try:
        with tempfile.TemporaryDirectory() as folder:
            # An output in the store is fetched to a file (a clip may be large): read_bytes held it all in memory.
            output = job.output if url is None else store.get(url, Path(folder) / job.output.name)
            if job.clip is not None:
                return clip_key(output) == job.key
            return read_metadata(output).get("batchstyle:key") == job.key
    except Exception:  # noqa: BLE001 - an unreadable file is simply not finished work
        return False


def _planned(job: Job) -> Planned:
    row = job.row
    return Planned(job.output, row.number, row.place(row.content), ";".join(map(row.place, row.styles)), job.key)


def mark_pending(ledger: Ledger, job: Job, run_id: int) -> None:
    """One row recorded as to do, outside planning (tests set a ledger up with it)."""
    ledger.plan_rows(run_id, [_planned(job)])


def without_row(number: int, error: str) -> str:
    """The summary prints `row N: ...` itself; the ledger keeps the full text."""
    prefix = f"row {number}"
    return error[len(prefix) :].lstrip(": ") if error.startswith(prefix) else error
