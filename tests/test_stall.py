"""The stall watch decides on a clock the test moves by hand: no process is started and nothing waits, so no
decision here can be swayed by a loaded machine. The pool is the real `ProcessPool` (its stamps, its dispatch of
the workers' messages, its watch and its replacement rule); only the process behind each slot is a stand-in that
records what was done to it, and the messages it "sends" are the real records of `batchstyle.run.messages`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from batchstyle.run.messages import (
    ActorResults,
    ActorState,
    Beat,
    Fatal,
    Fault,
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
from batchstyle.run.pools import (
    ENGINE_BUILD_ALLOWANCE,
    SESSION_ALLOWANCE,
    START_ALLOWANCE,
    ProcessPool,
    RayPool,
    _Actor,
    _Slot,
    overdue,
    stall_limit,
)


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeConn:
    """The parent's end of a pipe: what the parent sent, and what the worker "said" (brought in by the pool's drain)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.inbox: list[Any] = []
        self.closed = False

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def poll(self) -> bool:
        return bool(self.inbox)

    def recv(self) -> Any:
        return self.inbox.pop(0)

    def close(self) -> None:
        self.closed = True


class FakeProcess:
    exitcode = None
    sentinel = -1

    def __init__(self) -> None:
        self.killed = False

    def kill(self) -> None:
        self.killed = True

    def terminate(self) -> None:
        self.killed = True

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return not self.killed


class Recorder:
    def __init__(self) -> None:
        self.lost_calls: list[tuple[int, str, bool, bool]] = []
        self.result_calls: list[tuple[int, list[Result]]] = []
        self.progress_calls: list[tuple[int, int, int, dict[str, float]]] = []
        self.messages: list[str] = []

    def progress(self, slot: int, row: int, iteration: int, losses: dict[str, float]) -> None:
        self.progress_calls.append((slot, row, iteration, losses))

    def results(self, slot: int, results: list[Result]) -> None:
        self.result_calls.append((slot, results))

    def lost(self, slot: int, reason: str, counts: bool, hung: bool = False, cause: str | None = None) -> None:
        self.lost_calls.append((slot, reason, counts, hung))

    def message(self, text: str) -> None:
        self.messages.append(text)


class Pool(ProcessPool):
    """A ProcessPool whose slots' processes are stand-ins: everything else is the pool's own."""

    def _spawn(self, index: int) -> tuple[Any, Any]:
        self.spawned.append(index)
        return FakeProcess(), FakeConn()

    def __init__(self, specs: list[WorkerSpec], timeout: float | None, clock: Clock) -> None:
        self.spawned: list[int] = []
        self.recorder = Recorder()
        super().__init__(specs, self.recorder, stall_timeout=timeout, clock=clock)

    def tell(self, index: int, *messages: Any) -> None:
        """The worker in the slot sends these; the parent reads them at once."""
        self._slots[index].conn.inbox.extend(messages)
        self._drain(index)

    def queue(self, index: int, *messages: Any) -> None:
        """The worker sends these; the parent reads them when next it looks (the watch drains first)."""
        self._slots[index].conn.inbox.extend(messages)


def spec(tmp_path: Path, device: str = "cpu", targets: str = "ort") -> WorkerSpec:
    return WorkerSpec(model="random", cache_dir=tmp_path, device=device, targets=targets)


JOB = SimpleNamespace(row=SimpleNamespace(number=7))  # a pool reads nothing of a job but its row's number
LOSSES = {"content": 1.0, "style": 2.0, "tv": 0.5, "total": 3.5}


@pytest.fixture
def clock() -> Clock:
    return Clock()


def busy_pool(tmp_path: Path, clock: Clock, timeout: float | None = 10, device: str = "cpu") -> Pool:
    """One slot whose worker said it was ready and was just handed a batch."""
    pool = Pool([spec(tmp_path, device)], timeout, clock)
    pool.tell(0, Ready(pid=123))
    pool.submit(0, [JOB])  # type: ignore[list-item]
    return pool


# --- the decision --------------------------------------------------------------------------------------------------


def test_the_stall_limit_allows_for_start_up_and_for_building_engines(tmp_path: Path) -> None:
    cpu, gpu = spec(tmp_path), spec(tmp_path, "cuda:1")
    assert stall_limit(10, True, "working", cpu) == 10
    # Opening an ONNX Runtime session on a loaded CPU: tens of seconds of silence from a healthy worker.
    assert stall_limit(10, True, "targets", cpu) == SESSION_ALLOWANCE
    assert stall_limit(10, True, "targets", spec(tmp_path, targets="torch")) == 10
    # Importing torch, loading weights and opening a device come before a worker can say anything.
    assert stall_limit(10, False, "starting", cpu) == START_ALLOWANCE
    assert stall_limit(4 * START_ALLOWANCE, False, "starting", cpu) == 4 * START_ALLOWANCE
    # Targets on a GPU through ONNX Runtime may mean a first TensorRT engine build: minutes with nothing to report.
    assert stall_limit(10, True, "targets", gpu) == ENGINE_BUILD_ALLOWANCE
    assert stall_limit(10, True, "working", gpu) == 10
    assert stall_limit(10, True, "targets", spec(tmp_path, "cuda:1", targets="torch")) == 10


def test_overdue_is_silence_past_the_limit_of_a_member_holding_a_batch(tmp_path: Path) -> None:
    member = _Slot("cpu", spec(tmp_path), ready=True, phase="working", last_sign=100.0, batch=[JOB])  # type: ignore[list-item]
    assert overdue(member, 10, now=109.0) is None
    assert overdue(member, 10, now=110.0) is None  # at the limit: not yet
    assert overdue(member, 10, now=110.5) == 10.5
    member.batch = None
    assert overdue(member, 10, now=10_000.0) is None  # idle: nothing to say, so no silence counts
    starting = _Slot("cpu", spec(tmp_path), ready=False, last_sign=100.0, batch=[JOB])  # type: ignore[list-item]
    assert overdue(starting, 10, now=100.0 + START_ALLOWANCE) is None
    assert overdue(starting, 10, now=101.0 + START_ALLOWANCE) == 1.0 + START_ALLOWANCE


# --- the pool's watch ----------------------------------------------------------------------------------------------


def test_a_worker_silent_less_than_the_limit_is_kept_and_one_silent_longer_is_killed_and_replaced(
    tmp_path: Path, clock: Clock
) -> None:
    pool = busy_pool(tmp_path, clock)
    first = pool._slots[0].process
    assert pool._slots[0].conn.sent == [RunBatch((JOB,))]
    clock.advance(9)
    pool._watch()
    assert not first.killed and pool.recorder.lost_calls == []
    # Every message is a sign of life: progress at 9 s starts the silence over.
    pool.queue(0, Progress({7: RowProgress(3, LOSSES)}))
    pool._watch()
    assert pool.recorder.progress_calls == [(0, 7, 3, LOSSES)]
    clock.advance(10)
    pool._watch()
    assert not first.killed
    clock.advance(1)
    pool._watch()
    assert first.killed and pool._slots[0].conn is not None and pool._slots[0].process is not first
    # Its row is lost with a retry charged (it had started), and a fresh worker takes the slot.
    assert pool.recorder.lost_calls == [(0, "hung: no sign of life for 11 s; killed and replaced", True, True)]
    assert pool.spawned == [0, 0] and pool._slots[0].batch is None and not pool._slots[0].ready


def test_the_replacement_holds_nothing_so_its_silence_is_never_a_hang(tmp_path: Path, clock: Clock) -> None:
    pool = busy_pool(tmp_path, clock)
    clock.advance(11)
    pool._watch()
    assert len(pool.recorder.lost_calls) == 1
    clock.advance(10 * START_ALLOWANCE)
    pool._watch()
    assert len(pool.recorder.lost_calls) == 1 and pool.spawned == [0, 0]
    # Handed the retried row before it said it was ready, it has the start allowance, counted from the handing.
    pool.submit(0, [JOB])  # type: ignore[list-item]
    clock.advance(START_ALLOWANCE)
    pool._watch()
    assert len(pool.recorder.lost_calls) == 1
    pool.queue(0, Ready(pid=124))
    clock.advance(1)
    pool._watch()
    assert len(pool.recorder.lost_calls) == 1 and pool._slots[0].ready
    clock.advance(11)  # ready: the stall timeout applies again
    pool._watch()
    assert len(pool.recorder.lost_calls) == 2 and pool.spawned == [0, 0, 0]


def test_a_starting_worker_has_the_start_allowance_and_three_failed_starts_give_the_slot_up(
    tmp_path: Path, clock: Clock
) -> None:
    pool = Pool([spec(tmp_path)], 10, clock)
    for attempt in range(1, Pool.MAX_FAILED_STARTS + 1):
        pool.submit(0, [JOB])  # type: ignore[list-item]
        clock.advance(START_ALLOWANCE)
        pool._watch()
        assert len(pool.recorder.lost_calls) == attempt - 1
        clock.advance(1)
        pool._watch()
        slot, reason, counts, hung = pool.recorder.lost_calls[-1]
        assert not counts and hung  # a worker that never started is not the row's fault: no retry charged
        assert pool._slots[0].failed_starts == attempt
        if attempt < Pool.MAX_FAILED_STARTS:
            assert reason.endswith("killed and replaced") and pool.spawned == [0] * (attempt + 1)
    assert reason == f"hung: no sign of life for {START_ALLOWANCE + 1:.0f} s; killed"
    assert pool.spawned == [0] * Pool.MAX_FAILED_STARTS and not pool.usable() and pool.idle() == []
    assert pool.recorder.messages == [f"worker on cpu failed 3 times to start ({reason})"]


def test_failed_starts_count_in_a_row_only(tmp_path: Path, clock: Clock) -> None:
    pool = Pool([spec(tmp_path)], 10, clock)
    for _ in range(Pool.MAX_FAILED_STARTS - 1):
        pool.submit(0, [JOB])  # type: ignore[list-item]
        clock.advance(START_ALLOWANCE + 1)
        pool._watch()
    pool.tell(0, Ready(pid=125))  # this one started: the slot is sound after all
    assert pool._slots[0].failed_starts == 0
    pool.submit(0, [JOB])  # type: ignore[list-item]
    clock.advance(START_ALLOWANCE + 1)
    pool._watch()  # it started, then hung: no failed start
    assert pool.usable() and pool._slots[0].failed_starts == 0
    pool.submit(0, [JOB])  # type: ignore[list-item]
    clock.advance(START_ALLOWANCE + 1)
    pool._watch()  # its replacement cannot start: one failed start in a row, not a third
    assert pool.usable() and pool._slots[0].failed_starts == 1
    assert all(reason.endswith("and replaced") for _, reason, _, _ in pool.recorder.lost_calls)


def test_a_worker_building_an_engine_has_the_engine_build_allowance_while_in_that_phase(
    tmp_path: Path, clock: Clock
) -> None:
    pool = busy_pool(tmp_path, clock, device="cuda:0")
    pool.queue(0, Beat("targets"))
    clock.advance(ENGINE_BUILD_ALLOWANCE - 1)  # the beat was read at the first watch: silent since then
    pool._watch()
    clock.advance(1)
    pool._watch()
    assert pool.recorder.lost_calls == []
    pool.queue(0, Beat("working"))  # targets done: back to the stall timeout
    pool._watch()
    clock.advance(11)
    pool._watch()
    assert pool.recorder.lost_calls == [(0, "hung: no sign of life for 11 s; killed and replaced", True, True)]


def test_a_worker_stuck_building_an_engine_is_killed_past_that_allowance(tmp_path: Path, clock: Clock) -> None:
    pool = busy_pool(tmp_path, clock, device="cuda:0")
    pool.tell(0, Beat("targets"))
    clock.advance(ENGINE_BUILD_ALLOWANCE + 1)
    pool._watch()
    assert [reason for _, reason, _, _ in pool.recorder.lost_calls] == [
        f"hung: no sign of life for {ENGINE_BUILD_ALLOWANCE + 1:.0f} s; killed and replaced"
    ]


def test_results_brought_in_by_the_watch_are_not_taken_for_a_hang(tmp_path: Path, clock: Clock) -> None:
    pool = busy_pool(tmp_path, clock)
    clock.advance(30)  # the parent was busy; the results wait in the pipe
    result = Result(7, "done", 1.0)
    pool.queue(0, Note("ran on CPU"), Results((result,)))
    pool._watch()
    assert pool.recorder.lost_calls == [] and pool.recorder.result_calls == [(0, [result])]
    assert pool.recorder.messages == ["ran on CPU"] and pool.idle() == [0]


def test_only_the_silent_worker_of_two_is_killed(tmp_path: Path, clock: Clock) -> None:
    pool = Pool([spec(tmp_path), spec(tmp_path)], 10, clock)
    for index in (0, 1):
        pool.tell(index, Ready(pid=100 + index))
        pool.submit(index, [JOB])  # type: ignore[list-item]
    for _ in range(5):
        clock.advance(4)
        pool.queue(1, Beat("working"))
        pool._watch()
    assert [(slot, counts) for slot, _, counts, _ in pool.recorder.lost_calls] == [(0, True)]
    assert pool._slots[1].batch == [JOB] and pool.spawned == [0, 1, 0]


def test_a_draining_pool_kills_a_hung_worker_without_replacing_it(tmp_path: Path, clock: Clock) -> None:
    pool = busy_pool(tmp_path, clock)
    pool.drain()
    clock.advance(11)
    pool._watch()
    assert pool.recorder.lost_calls == [(0, "hung: no sign of life for 11 s; killed", True, True)]
    assert pool.spawned == [0] and pool._slots[0].process is None


@pytest.mark.parametrize("timeout", [None, 0])
def test_with_the_stall_timeout_off_no_worker_is_ever_killed(tmp_path: Path, clock: Clock, timeout: float) -> None:
    pool = busy_pool(tmp_path, clock, timeout=timeout)
    clock.advance(10 * ENGINE_BUILD_ALLOWANCE)
    pool._watch()
    assert pool.recorder.lost_calls == [] and not pool._slots[0].process.killed


def test_a_fatal_start_and_a_fault_are_read_by_their_type(tmp_path: Path, clock: Clock) -> None:
    pool = Pool([spec(tmp_path)], 10, clock)
    pool.tell(0, Fault("DeviceFault: illegal memory access"), Fatal("worker on cpu could not start: boom"))
    assert pool._slots[0].fault == "DeviceFault: illegal memory access"
    assert pool._slots[0].broken == "worker on cpu could not start: boom"
    assert pool.recorder.messages == ["worker on cpu could not start: boom"]
    pool.retire(0, "taken out")
    assert pool._slots[0].conn.sent == [Stop()]


def test_a_ray_actors_silence_is_the_one_it_reports_measured_on_its_own_clock(tmp_path: Path, clock: Clock) -> None:
    """No clocks are compared across nodes: a poll's answer says how long ago the actor's last sign of life was, and
    the driver dates it back from its own clock. (A RayPool without Ray: only its bookkeeping of polls is used.)"""
    pool = object.__new__(RayPool)
    pool.clock, pool.events = clock, Recorder()
    actor = _Actor(spec(tmp_path), {}, batch=[JOB], started=True)  # type: ignore[list-item]
    pool._actors = pool._members = [actor]
    pool._polled(0, ActorState(silent=4.0, phase="working", rows={}, notes=("ran on CPU",)))
    assert overdue(actor, 10, clock()) is None and pool.events.messages == ["ran on CPU"]
    clock.advance(6)
    assert overdue(actor, 10, clock()) is None
    clock.advance(1)
    assert overdue(actor, 10, clock()) == 11.0


def test_every_message_survives_the_pipe() -> None:
    result = Result(7, "done", 1.5, iterations=3)
    progress = RowProgress(3, LOSSES)
    messages = [
        RunBatch((JOB,)),  # type: ignore[arg-type]
        Stop(),
        Ready(123),
        Beat("targets"),
        Note("text"),
        Progress({7: progress}),
        Results((result,)),
        Fatal("reason"),
        Fault("cause"),
        ActorState(1.5, "working", {7: progress}, ("text",)),
        ActorResults((result,), ("text",)),
    ]
    for message in messages:
        assert pickle.loads(pickle.dumps(message)) == message
