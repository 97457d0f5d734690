"""What the parent and its workers say to each other, one named record per kind of message.

A worker process and its parent share a pipe; a Ray actor answers its driver's calls. Either way what crosses is
pickled, and each side dispatches on the record's type (as CPython's concurrent.futures.process does with its
_CallItem and _ResultItem) rather than on a tag and positions in a tuple: a field added or renamed is then found by
the type checker at every reader, not at run time by an index that now means something else.

Every message a worker sends is a sign of life to the parent's stall watch (`batchstyle.run.pools`). This module
imports nothing heavy (no torch): the types it names are only annotations, so a run's parent plans without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from batchstyle.model.graph import GraphSpec

if TYPE_CHECKING:
    from batchstyle.model.optimize import Losses
    from batchstyle.run.plan import Job

# -- what a host needs to build a worker, and what a worker makes of a row ---------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """How to build a worker in any process: by name, never by object."""

    model: str  # a registry name or a weights file path, as resolved by the parent
    cache_dir: Path
    device: str
    targets: str = "ort"  # ort | torch
    trt_fp16: bool = False
    profile: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    torch_targets: frozenset[GraphSpec] = frozenset()  # graphs whose export failed: computed with torch
    save_every: int = 0
    precision: str = "auto"  # auto (measured on this device by the worker: `model.precision`) | fp32 | tf32 | bf16
    max_memory: int | None = None  # bytes a row may use; None: `tiles.default_budget` of the device, asked here
    tile: int | None = None  # None: tiled only where a row would not fit; 0: never; N: tiles of N px
    scratch: Path | None = None  # the run's output folder: an L-BFGS history too large for memory goes there
    tile_devices: tuple[str, ...] = ()  # --spread-tiles: more devices a tiled row's tiles are dealt to
    threads: int | None = None  # torch (and ORT) threads; None leaves the process default
    # A Ray actor where no --cache-dir was given: weights, targets and graphs go to its own node's default cache
    # (its $BATCHSTYLE_CACHE or ~/.cache/batchstyle); the driver's cache path means nothing on a node that shares
    # no folder with it.
    node_cache: bool = False
    shared_cache: str | None = None  # --cache-dir as a URL: targets and graphs shared through the store


@dataclass
class Result:
    row: int
    status: str  # done | failed
    seconds: float
    iterations: int = 0
    losses: Losses | None = None  # the kept iterate's terms by name (a clip: its last frame's) and total
    error: str | None = None
    history: list[Losses] = field(default_factory=list)  # every iteration's, by term: the ledger's loss curves
    targets: str | None = None  # where the targets came from, e.g. "content=hit style=miss,hit"
    provider: str | None = None
    scales: list[tuple[int, int, int]] = field(default_factory=list)  # (width, height, iterations) per scale
    stops: list[str] = field(default_factory=list)  # why each scale stopped: "iterations" or "converged"
    colours: list[str] = field(default_factory=list)  # per style, how its colours were taken (color=auto decides)
    faces: list[list[float]] | None = None  # faces=auto: the faces found, [x, y, w, h] as fractions; None: not looked
    batch: int = 1  # images optimised together with this one
    cause: str | None = None  # a failure that is not the row's own: a signature without the row's paths
    full: Path | None = None  # the folder with no room left for it (`full_folder`): the run stops, the row waits
    precision: str | None = None  # what the network ran in (fp32 | tf32 | bf16), for the ledger
    precision_measured: str | None = None  # how `auto` decided it on this machine: the timings and the choice
    frames: int = 0  # a clip job: frames stylized by this call (finished ones from before are not redone)
    temporal_error: float | None = None  # an assembled clip's flicker (run.clip.clip_temporal_error)
    # per scale: tile px (0: untiled), L-BFGS pairs, where they were kept, devices the tiles were dealt to
    tiling: list[tuple[int, int, str, int]] = field(default_factory=list)
    memory_budget: int | None = None  # bytes the row was fitted in


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
