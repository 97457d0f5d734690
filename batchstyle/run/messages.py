"""What the parent and its workers say to each other, one named record per kind of message.

A worker process and its parent share a pipe; a Ray actor answers its driver's calls. Either way what crosses is
pickled, and each side dispatches on the record's type (as CPython's concurrent.futures.process does with its
_CallItem and _ResultItem) rather than on a tag and positions in a tuple: a field added or renamed is then found by
the type checker at every reader, not at run time by an index that now means something else.

Every message a worker sends is a sign of life to the parent's stall watch (`batchstyle.run.pools`). This module
imports nothing heavy: the types it names are only annotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchstyle.run.plan import Job
    from batchstyle.run.worker import Result

# -- parent -> worker process ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunBatch:
    """Run these jobs and answer with their `Results`."""

    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Stop:
    """Exit once idle: the run is over, or this slot is taken out of it."""


# -- worker process -> parent ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """Built and able to take a batch: its start-up allowance is over."""

    pid: int


@dataclass(frozen=True)
class Beat:
    """A sign of life between iterations: the batch started, or the worker passed into another phase (a scale's
    targets, which may mean minutes of TensorRT engine build, or working on)."""

    phase: str


@dataclass(frozen=True)
class Note:
    """A line for the run's log (a warning, what a device runs on)."""

    text: str


@dataclass(frozen=True)
class RowProgress:
    """A row's latest iteration (counted across scales) and its losses by name."""

    iteration: int
    losses: dict[str, float]


@dataclass(frozen=True)
class Progress:
    """The latest iteration of each row of the batch that moved since the last `Progress`."""

    rows: dict[int, RowProgress]


@dataclass(frozen=True)
class Results:
    """The batch is over: a result for each of its jobs, in their order."""

    results: tuple[Result, ...]


@dataclass(frozen=True)
class Fatal:
    """The worker could not start; it exits after this."""

    reason: str


@dataclass(frozen=True)
class Fault:
    """A device fault's short signature, sent just before the worker exits with DEVICE_FAULT_EXIT: the parent takes
    out a slot whose device keeps faulting."""

    cause: str


ToWorker = RunBatch | Stop
FromWorker = Ready | Beat | Note | Progress | Results | Fatal | Fault

# -- Ray actor -> driver (answers to its calls) ------------------------------------------------------------------


@dataclass(frozen=True)
class ActorState:
    """An answer to the driver's poll. `silent` is measured on the actor's own clock, so no clocks are compared
    across nodes."""

    silent: float  # seconds since the actor's last sign of life
    phase: str
    rows: dict[int, RowProgress]  # the latest iteration of each row of the batch in flight
    notes: tuple[str, ...]  # log lines since the last poll


@dataclass(frozen=True)
class ActorResults:
    """A batch's results, with the log lines its last poll did not carry."""

    results: tuple[Result, ...]
    notes: tuple[str, ...]
