"""Where workers live: in the parent itself, in spawned processes (one per device slot), or in Ray actors.

The engine sees one small interface whatever the host: which slots are idle, hand a slot a batch, wait for
something to happen. Things that happen are reported through `PoolEvents`: progress of a row, a batch's results,
a worker lost with its batch in flight (the engine decides about retries), and messages for the log.

Hung workers: every message a worker sends is a sign of life (progress per iteration, and beats when a batch starts
and between phases). A worker process or Ray actor that holds a batch and stays silent for the stall timeout is
killed and replaced, and its rows are lost like a dead worker's. The in-process slot cannot watch itself. Whether a
member is hung is `overdue`, a decision on its last sign of life and the pool's clock alone (injected, so that tests
decide it with a clock they move by hand, not by waiting).

What crosses between the parent and a worker process or Ray actor is a record of `batchstyle.run.messages`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from batchstyle.errors import RunError
from batchstyle.model.weights import Weights
from batchstyle.run.devices import DEVICE_FAULT_EXIT, DeviceFault
from batchstyle.run.hooks import TEST_HANG_ROW, hang_if_asked
from batchstyle.run.messages import (
    ActorResults,
    ActorState,
    Beat,
    Fatal,
    Fault,
    FromWorker,
    Note,
    Progress,
    Ready,
    Result,
    Results,
    RowProgress,
    RunBatch,
    Stop,
    WorkerSpec,
)
from batchstyle.run.plan import Job

if TYPE_CHECKING:
    from batchstyle.run.worker import Worker

Clock = Callable[[], float]  # seconds, only ever subtracted from one another: time.monotonic

START_ALLOWANCE = 300.0  # seconds a starting worker (importing torch, loading weights, opening its device) may take
ENGINE_BUILD_ALLOWANCE = 1800.0  # seconds ONNX Runtime may take to build a TensorRT engine while computing targets
# Seconds ONNX Runtime may take computing targets on a CPU: opening a session for the VGG graph is a few seconds on an
# idle machine, but a healthy Ray actor doing so was silent past 30 s with two CPU burners and a second test session
# on 2 cores (and killed as hung), and a whole suite beside the hang test with two burners took it past 90 s.
SESSION_ALLOWANCE = START_ALLOWANCE
POLL_INTERVAL = 0.5  # seconds between progress polls of a busy Ray actor


def stall_limit(timeout: float, started: bool, phase: str, spec: WorkerSpec) -> float:
    """Seconds a worker holding a batch may stay silent before it is taken as hung: the stall timeout, but never
    less than START_ALLOWANCE before it said it was ready, nor than ENGINE_BUILD_ALLOWANCE while it computes targets
    on a GPU with ONNX Runtime (a first TensorRT engine build is minutes of silence, and happens once per cache), nor
    than SESSION_ALLOWANCE while it does so on a CPU. A hang anywhere else is still caught at the stall timeout."""
    if not started:
        return max(timeout, START_ALLOWANCE)
    if phase == "targets" and spec.targets == "ort":
        return max(timeout, ENGINE_BUILD_ALLOWANCE if spec.device.startswith("cuda") else SESSION_ALLOWANCE)
    return timeout


class Watched(Protocol):
    """What the stall watch reads of a pool's member."""

    @property
    def batch(self) -> list[Job] | None: ...
    @property
    def started(self) -> bool: ...  # it said it was ready
    @property
    def phase(self) -> str: ...  # what its last beat said it was doing
    @property
    def spec(self) -> WorkerSpec: ...
    @property
    def last_sign(self) -> float: ...  # the pool's clock at its last sign of life, or at the batch handed to it


def overdue(member: Watched, timeout: float, now: float) -> float | None:
    """Seconds of silence of a member that holds a batch and has been silent past its stall limit; None while it
    is idle or may still be at work. An idle member's silence is no hang: it has nothing to say."""
    if member.batch is None:
        return None
    silent = now - member.last_sign
    return silent if silent > stall_limit(timeout, member.started, member.phase, member.spec) else None


def hung_reason(silent: float, replaced: bool) -> str:
    return f"hung: no sign of life for {silent:.0f} s; killed" + (" and replaced" if replaced else "")


class PoolEvents(Protocol):
    def progress(self, slot: int, row: int, iteration: int, losses: dict[str, float]) -> None: ...
    def results(self, slot: int, results: list[Result]) -> None: ...
    def lost(self, slot: int, reason: str, counts: bool, hung: bool = False, cause: str | None = None) -> None: ...
    def message(self, text: str) -> None: ...


class Pool(Protocol):
    slots: list[str]  # the device of each slot
    replaced: int  # workers started afresh after one died or hung, so far
    stalls_killed: int  # of those, killed as hung

    def idle(self) -> list[int]: ...
    def busy(self) -> bool: ...
    def usable(self) -> bool: ...
    def submit(self, slot: int, batch: Sequence[Job]) -> None: ...
    def wait(self, timeout: float) -> None: ...
    def drain(self) -> None: ...  # a stop was asked for: replace no worker that dies from now on
    def retire(self, slot: int, reason: str) -> None: ...  # take an idle slot out of the run for good
    def close(self, now: bool = False) -> None: ...


class InlinePool:
    """One slot, in the parent process: no start-up cost, and Ctrl-C reaches the row directly. It cannot watch
    itself for a hang: the parent is the worker."""

    def __init__(self, spec: WorkerSpec, events: PoolEvents, weights: Weights | None = None) -> None:
        self.slots = [spec.device]
        self.replaced = self.stalls_killed = 0  # the parent is the worker: nothing to replace or kill
        self.spec = spec
        self.weights = weights
        self.events = events
        self.worker: Worker | None = None
        self.batch: list[Job] | None = None
        self.broken: str | None = None

    def idle(self) -> list[int]:
        return [0] if self.batch is None and self.broken is None else []

    def busy(self) -> bool:
        return self.batch is not None

    def usable(self) -> bool:
        return self.broken is None

    def submit(self, slot: int, batch: Sequence[Job]) -> None:
        self.batch = list(batch)

    def wait(self, timeout: float) -> None:
        if self.batch is None:
            return
        batch = self.batch
        if self.worker is None:
            from batchstyle.run.worker import Worker  # torch: only once a row runs, never while planning

            try:
                self.worker = Worker.build(self.spec, self.events.message, self.weights)
            except Exception as exc:  # noqa: BLE001 - reported like a worker that could not start
                self.broken = f"worker on {self.spec.device} could not start: {exc.__class__.__name__}: {exc}"
                self.batch = None
                self.events.message(self.broken)
                self.events.lost(0, self.broken, counts=False)
                return
        results = self.worker.run_batch(batch, lambda row, i, losses: self.events.progress(0, row, i, losses.as_dict()))
        self.batch = None
        self.events.results(0, results)

    def drain(self) -> None:
        pass

    def retire(self, slot: int, reason: str) -> None:
        self.broken = reason
        self.close()

    def close(self, now: bool = False) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def _serve(conn: Any, spec: WorkerSpec) -> None:
    """A spawned worker process's target: `worker.serve`, imported in the child, so that the parent (which plans
    without torch) never imports the worker's module."""
    from batchstyle.run.worker import serve

    serve(conn, spec)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def death_reason(exitcode: int | None) -> str:
    """A worker's exit, in words a person running the batch can act on."""
    if exitcode is None:
        return "lost contact"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the kernel's out-of-memory killer sends this)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    if exitcode == DEVICE_FAULT_EXIT:
        return "stopped after a device fault (its CUDA context cannot be trusted)"
    return f"exited with code {exitcode}"


class _ReplacingPool:
    """What local processes and Ray actors share: members that each hold at most one batch, and the rule for a
    member that dies. A death before the member said it was ready does not charge its rows a retry, and a member
    that cannot start MAX_FAILED_STARTS times in a row is given up; otherwise a fresh one takes its place."""

    MAX_FAILED_STARTS = 3
    replaced = 0  # members started afresh after one died or hung (counted before the engine hears of the loss)
    stalls_killed = 0
    events: PoolEvents
    closing: bool
    stall_timeout: float | None  # None or 0: no member is ever taken as hung
    clock: Clock  # what every sign of life is stamped with and the silence measured by
    _members: list[Any]

    def idle(self) -> list[int]:
        return [i for i, m in enumerate(self._members) if m.batch is None and m.broken is None]

    def busy(self) -> bool:
        return any(m.batch is not None for m in self._members)

    def usable(self) -> bool:
        return any(m.broken is None for m in self._members)

    def drain(self) -> None:
        self.closing = True

    def retire(self, slot: int, reason: str) -> None:
        self._members[slot].broken = reason
        self._stop(slot)

    def _start(self, index: int) -> None:
        raise NotImplementedError

    def _stop(self, index: int) -> None:
        """Ends an idle member that is not to be replaced."""
        raise NotImplementedError

    def _kill(self, index: int) -> None:
        """Ends a member at once, whatever state it is in (stopped, stuck in a driver call)."""
        raise NotImplementedError

    def _watched(self, index: int) -> bool:
        """Whether the member's silence can be judged now (brings its latest signs of life in first)."""
        raise NotImplementedError

    def _replace(self, index: int, reason: str, started: bool, hung: bool = False, cause: str | None = None) -> None:
        member = self._members[index]
        if not started:
            member.failed_starts += 1
            if member.failed_starts >= self.MAX_FAILED_STARTS and member.broken is None:
                member.broken = f"worker on {member.device} failed {member.failed_starts} times to start ({reason})"
                self.events.message(member.broken)
        replacing = not self.closing and member.broken is None
        self.replaced += replacing
        self.stalls_killed += hung
        if member.batch is not None:
            member.batch = None
            self.events.lost(index, reason, counts=started, hung=hung, cause=cause)
        if replacing:
            self._start(index)

    def _watch(self) -> None:
        """Kills and replaces each member that holds a batch and has been silent longer than its stall limit; its
        rows are lost like a dead worker's (a retry is charged only once it had started)."""
        if not self.stall_timeout:
            return
        for index, member in enumerate(self._members):
            if member.batch is None or not self._watched(index):
                continue
            # (the signs brought in may have been the batch's results: then it holds no batch any more)
            silent = overdue(member, self.stall_timeout, self.clock())
            if silent is None:
                continue
            started = member.started
            replaced = not self.closing and member.broken is None
            replaced = replaced and (started or member.failed_starts + 1 < self.MAX_FAILED_STARTS)
            self._kill(index)
            self._replace(index, hung_reason(silent, replaced), started=started, hung=True)


@dataclass
class _Slot:
    device: str
    spec: WorkerSpec
    process: Any = None
    conn: Any = None
    batch: list[Job] | None = None
    ready: bool = False
    failed_starts: int = 0  # deaths before "ready", in a row: a slot that cannot start is given up
    broken: str | None = None
    last_sign: float = 0.0  # the pool's clock at its last message, or at the batch handed to it
    phase: str = "starting"  # what its last beat said it was doing
    fault: str | None = None  # the device fault it reported before exiting

    @property
    def started(self) -> bool:
        return self.ready


class ProcessPool(_ReplacingPool):
    """A spawned process per slot, each owning its model, ONNX Runtime session and CUDA context.

    Spawned, not forked: CUDA cannot be re-initialised in a forked child, and a fresh interpreter holds nothing of
    the parent's. A dead worker is replaced by a fresh one; the engine is told, and re-queues or fails its rows.
    """

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        events: PoolEvents,
        stall_timeout: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.events = events
        self.stall_timeout = stall_timeout
        self.clock = clock
        self._slots = self._members = [_Slot(spec.device, spec) for spec in specs]
        self.slots = [slot.device for slot in self._slots]
        self.closing = False
        for index in range(len(self._slots)):
            self._start(index)

    def _start(self, index: int) -> None:
        slot = self._slots[index]
        slot.process, slot.conn = self._spawn(index)
        slot.ready, slot.last_sign, slot.phase = False, self.clock(), "starting"

    def _spawn(self, index: int) -> tuple[Any, Any]:
        """A worker process for the slot, started, and the parent's end of its pipe."""
        parent, child = self.context.Pipe()
        process = self.context.Process(
            target=_serve, args=(child, self._slots[index].spec), name=f"batchstyle-worker-{index}", daemon=True
        )
        # The child starts with Ctrl-C blocked and unblocks it only once it ignores it: a Ctrl-C meant for the
        # parent (a drain) must not kill a worker that is still importing torch.
        with _sigint_blocked():
            process.start()
        child.close()
        return process, parent

    def _stop(self, index: int) -> None:
        s = self._slots[index]
        if s.conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                s.conn.send(Stop())  # it exits; its sentinel then finds a broken slot, replaced by none

    def _kill(self, index: int) -> None:
        s = self._slots[index]
        s.process.kill()  # SIGKILL: ends a stopped (SIGSTOP) or stuck process too
        s.process.join(timeout=5)
        s.conn.close()
        s.process, s.conn = None, None

    def _watched(self, index: int) -> bool:
        if self._slots[index].process is None:
            return False
        self._drain(index)
        return self._slots[index].process is not None

    def submit(self, slot: int, batch: Sequence[Job]) -> None:
        s = self._slots[slot]
        s.batch = list(batch)
        s.last_sign = self.clock()  # an idle worker's silence is no hang
        # If the process is dying, its sentinel reports it and the batch is handed out again.
        with contextlib.suppress(BrokenPipeError, OSError):
            s.conn.send(RunBatch(tuple(s.batch)))

    def wait(self, timeout: float) -> None:
        live = [s for s in self._slots if s.process is not None]
        waitables = [s.conn for s in live] + [s.process.sentinel for s in live]
        for ready in multiprocessing.connection.wait(waitables, timeout):
            for index, s in enumerate(self._slots):
                if s.process is None:
                    continue
                if ready is s.conn:
                    self._drain(index)
                elif ready == s.process.sentinel:
                    self._drain(index)
                    self._died(index)
        self._watch()

    def _drain(self, index: int) -> None:
        s = self._slots[index]
        try:
            while s.conn is not None and s.conn.poll():
                self._handle(index, s.conn.recv())
        except (EOFError, OSError):
            pass  # the sentinel says what happened

    def _handle(self, index: int, message: FromWorker) -> None:
        s = self._slots[index]
        s.last_sign = self.clock()
        match message:
            case Ready():
                s.ready, s.failed_starts, s.phase = True, 0, "idle"
            case Beat(phase=phase):
                s.phase = phase
            case Note(text=text):
                self.events.message(text)
            case Progress(rows=rows):
                s.phase = "working"
                for row, moved in rows.items():
                    self.events.progress(index, row, moved.iteration, moved.losses)
            case Results(results=results):
                s.batch = None
                self.events.results(index, list(results))
            case Fatal(reason=reason):
                s.broken = reason
                self.events.message(reason)
            case Fault(cause=cause):
                s.fault = cause

    def _died(self, index: int) -> None:
        s = self._slots[index]
        s.process.join(timeout=5)
        reason = s.broken or death_reason(s.process.exitcode)
        s.conn.close()
        was_ready, cause = s.ready, s.fault
        s.process, s.conn, s.fault = None, None, None
        self._replace(index, reason, started=was_ready, cause=cause)

    def close(self, now: bool = False) -> None:
        self.closing = True
        for s in self._slots:
            if s.process is None:
                continue
            if now:
                s.process.terminate()
            else:
                with contextlib.suppress(BrokenPipeError, OSError):
                    s.conn.send(Stop())
        deadline = time.monotonic() + 10
        for s in self._slots:
            if s.process is None:
                continue
            s.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if s.process.is_alive():
                s.process.kill()
                s.process.join()
            if s.conn is not None:
                s.conn.close()
            s.process, s.conn = None, None


class RayWorker:
    """The Ray actor: a `Worker` built inside the actor's process, the same code a local worker process runs.

    Threaded (`max_concurrency=2`): a batch runs in one thread while the driver polls `progress` from another, which
    is how the driver gets live per-iteration progress and its sign of life. The worker itself lives on a thread of
    its own (its SQLite target cache may only be used from the thread that opened it, and Ray's threads vary from
    call to call). Messages reach the driver through the polls and with the results rather than being printed, so
    they reach the driver's log on any node.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.lock = threading.Lock()
        self.notes: list[str] = []
        self.rows: dict[int, RowProgress] = {}
        self.phase, self.sign = "starting", time.monotonic()
        from batchstyle.run.worker import Worker

        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchstyle-worker")
        self.worker = self.thread.submit(Worker.build, spec, self._warn, None, True).result()
        self.worker.beat_with(self._beat)

    def ready(self) -> str:
        import socket

        return f"{socket.gethostname()}/{self.worker.device}"

    def progress(self) -> ActorState:
        with self.lock:
            notes, self.notes = tuple(self.notes), []
            return ActorState(time.monotonic() - self.sign, self.phase, dict(self.rows), notes)

    def run_batch(self, jobs: list[Job]) -> ActorResults:
        with self.lock:
            self.rows = {}
        self._beat("started")
        hang_if_asked(jobs)
        try:
            results = self.thread.submit(self.worker.run_batch, jobs, self._iteration).result()
        except DeviceFault:
            os._exit(DEVICE_FAULT_EXIT)  # the actor dies; the driver replaces it and hands the rows out again
        with self.lock:
            notes, self.notes = tuple(self.notes), []
            self.phase = "idle"
        return ActorResults(tuple(results), notes)

    def _warn(self, text: str) -> None:
        with self.lock:
            self.notes.append(text)

    def _beat(self, phase: str) -> None:
        with self.lock:
            self.phase, self.sign = phase, time.monotonic()

    def _iteration(self, row: int, iteration: int, losses: Any) -> None:
        with self.lock:
            self.rows[row] = RowProgress(iteration, losses.as_dict())
            self.phase, self.sign = "working", time.monotonic()


@dataclass
class _Actor:
    spec: WorkerSpec
    options: dict[str, Any]
    handle: Any = None
    ready: Any = None  # ObjectRef of ready(), until it answers
    call: Any = None  # ObjectRef of the batch in flight
    poll: Any = None  # ObjectRef of a progress() call, until it answers
    polled: float = 0.0  # when the last poll was sent
    batch: list[Job] | None = None
    started: bool = False
    failed_starts: int = 0
    broken: str | None = None
    last_sign: float = 0.0  # the driver's clock at the actor's last sign of life
    phase: str = "starting"
    seen: dict[int, int] = field(default_factory=dict)  # latest iteration reported per row of the batch

    @property
    def device(self) -> str:
        return f"Ray {self.spec.device}"


class RayPool(_ReplacingPool):
    """Workers as Ray actors: one per GPU of the cluster (`num_gpus=1`), or one per node on a cluster without GPUs,
    with all of that node's CPUs. The driver (this process) keeps the ledger; local outputs and inputs must be on
    paths every node sees, while a manifest's objects in a store need no shared folder: each actor stages its inputs
    and puts its outputs itself (`batchstyle.store`), with a cache of its own node's. A dead actor is replaced and
    its rows handed out again, as with local processes.
    A busy actor is polled every POLL_INTERVAL for its progress: an actor whose poll goes unanswered, or whose last
    sign of life is older than the stall timeout, is killed (`ray.kill`) and replaced. An actor still being placed
    or started is not watched: on a busy cluster it may rightly wait for resources.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        events: PoolEvents,
        address: str | None,
        retries: int,
        stall_timeout: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise RunError("--backend ray needs Ray: pip install 'batchstyle[ray]'") from None
        import logging

        self.events = events
        self.stall_timeout = stall_timeout
        self.clock = clock
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            # address="local" starts a private Ray even where a stale cluster file would make init() connect.
            try:
                ray.init(address=address or "local", logging_level=logging.WARNING, include_dashboard=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise RunError(
                    f"cannot reach the Ray cluster at {address!r}: {exc}; start one with `ray start --head`, give "
                    "its address (--address HOST:6379), or leave --address out to run Ray on this machine"
                ) from None
        self._actors = self._members = [_Actor(s, o) for s, o in self._placement(spec)]
        if not self._actors:
            self.close()
            raise RunError("the Ray cluster has no GPU and no CPU to run workers on")
        self.slots = [f"ray:{a.spec.device}" for a in self._actors]
        self.closing = False
        self.remote_class = ray.remote(RayWorker)
        for index in range(len(self._actors)):
            self._start(index)

    def _placement(self, spec: WorkerSpec) -> list[tuple[WorkerSpec, dict[str, Any]]]:
        from dataclasses import replace

        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        # `--precision auto` is left to each actor: it measures its own node's device, not this driver's.
        if gpus:
            # Ray sets CUDA_VISIBLE_DEVICES for each actor: its GPU is cuda:0 inside it.
            gpu = replace(spec, device="cuda:0", threads=1)
            return [(gpu, {"num_gpus": 1, "num_cpus": 1}) for _ in range(gpus)]
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        placed = []
        for node in ray.nodes():
            cpus = int(node.get("Resources", {}).get("CPU", 0))
            if node.get("Alive") and cpus:
                strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                cpu = replace(spec, device="cpu", threads=cpus)
                placed.append((cpu, {"num_cpus": cpus, "scheduling_strategy": strategy}))
        return placed

    def _start(self, index: int) -> None:
        actor = self._actors[index]
        options = {"max_restarts": 0, "max_task_retries": 0, "max_concurrency": 2, **actor.options}
        if TEST_HANG_ROW in os.environ:
            # A spawned process inherits the parent's environment; an actor gets the raylet's, fixed when Ray began.
            options["runtime_env"] = {"env_vars": {TEST_HANG_ROW: os.environ[TEST_HANG_ROW]}}
        actor.handle = self.remote_class.options(**options).remote(actor.spec)
        actor.ready, actor.started, actor.phase = actor.handle.ready.remote(), False, "starting"

    def _stop(self, index: int) -> None:
        self._kill(index)

    def _kill(self, index: int) -> None:
        actor = self._actors[index]
        if actor.handle is not None:
            import ray

            ray.kill(actor.handle, no_restart=True)
        actor.handle = actor.ready = actor.call = actor.poll = None

    def _watched(self, index: int) -> bool:
        actor = self._actors[index]
        return actor.handle is not None and actor.started

    def submit(self, slot: int, batch: Sequence[Job]) -> None:
        actor = self._actors[slot]
        actor.batch = list(batch)
        actor.seen, actor.last_sign = {}, self.clock()
        actor.call = actor.handle.run_batch.remote(actor.batch)

    def wait(self, timeout: float) -> None:
        now = self.clock()
        refs = {}
        for index, a in enumerate(self._actors):
            if a.ready is not None:
                refs[a.ready] = (index, "ready")
            if a.call is not None:
                refs[a.call] = (index, "call")
                if a.started and a.poll is None and now - a.polled >= POLL_INTERVAL:
                    a.poll, a.polled = a.handle.progress.remote(), now
            if a.poll is not None:
                refs[a.poll] = (index, "poll")
        if not refs:
            time.sleep(timeout)
            return
        import ray

        done, _ = ray.wait(list(refs), num_returns=1, timeout=min(timeout, POLL_INTERVAL))
        for ref in done:
            index, kind = refs[ref]
            self._finished(index, kind, ref)
        self._watch()

    def _finished(self, index: int, kind: str, ref: Any) -> None:
        import ray

        actor = self._actors[index]
        if ref is not actor.ready and ref is not actor.call and ref is not actor.poll:
            return  # a call of an actor already replaced: its death was handled once
        if kind == "poll":
            actor.poll = None
            try:
                self._polled(index, ray.get(ref))
            except ray.exceptions.RayTaskError:
                pass  # progress() itself failed: the batch's own call says what became of it
            except ray.exceptions.RayError as exc:
                self._died(index, f"Ray actor lost: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}")
            return
        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            # Worker.run_batch turns a row's errors into results; anything else is a bug: fail the batch's rows.
            actor.call = None
            batch, actor.batch = actor.batch or [], None
            error = f"worker error: {str(exc).splitlines()[-1][:300]}"
            self.events.results(index, [Result(job.row.number, "failed", 0.0, error=error) for job in batch])
            return
        except ray.exceptions.RayError as exc:
            # The actor died, its node went away, or it cannot be placed any more: replace it.
            self._died(index, f"Ray actor lost: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}")
            return
        if kind == "ready":
            actor.ready, actor.started, actor.failed_starts = None, True, 0
            actor.last_sign, actor.phase = self.clock(), "idle"
            self.slots[index] = f"ray:{value}"
            return
        done: ActorResults = value
        for text in done.notes:
            self.events.message(text)
        actor.call, actor.batch, actor.poll = None, None, None
        self.events.results(index, list(done.results))

    def _polled(self, index: int, state: ActorState) -> None:
        """An answered poll: a sign of life as old as the actor says, and the rows' new iterations."""
        actor = self._actors[index]
        actor.last_sign, actor.phase = self.clock() - state.silent, state.phase
        for text in state.notes:
            self.events.message(text)
        rows = {job.row.number for job in actor.batch or []}  # a late answer may describe a finished batch
        for row, moved in state.rows.items():
            if row in rows and moved.iteration > actor.seen.get(row, 0):
                actor.seen[row] = moved.iteration
                self.events.progress(index, row, moved.iteration, moved.losses)

    def _died(self, index: int, reason: str) -> None:
        self._kill(index)
        self._replace(index, reason, started=self._actors[index].started)

    def close(self, now: bool = False) -> None:
        self.closing = True
        import ray  # imported by __init__ already: this costs a dictionary look-up

        for actor in getattr(self, "_actors", []):
            if actor.handle is not None:
                ray.kill(actor.handle, no_restart=True)
                actor.handle = None
        if self.started_ray:
            ray.shutdown()
