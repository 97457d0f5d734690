"""What runs where the pixels are optimised: a worker owns its model, its ONNX Runtime session and its device, and
turns a batch of jobs into output files. It never touches the ledger; it reports results to the parent.

The same `Worker` serves three hosts: the parent itself (one device slot), a spawned process per device slot
(`serve`), and a Ray actor (`batchstyle.run.pools`). `WorkerSpec` is what a host needs to build one: plain, picklable
values, because weights and sessions are rebuilt inside the process that uses them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import signal
import sqlite3
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from batchstyle import store
from batchstyle.errors import free_space
from batchstyle.images import (
    ImageError,
    is_temp_file,
    iterates_folder,
    iterates_url,
    load_image,
    save_image_atomic,
    temp_file_target,
)
from batchstyle.model.build import build_stylizer
from batchstyle.model.optimize import Losses, LossNotFinite
from batchstyle.model.pixels import tensor_to_deep, tensor_to_image
from batchstyle.model.stylize import Hooks, Inputs, Stylized, Stylizer
from batchstyle.model.weights import Weights, default_cache_dir, resolve
from batchstyle.run.devices import (
    DEVICE_FAULT_EXIT,
    DeviceFault,
    empty_cache,
    is_device_fault,
    is_out_of_memory,
)
from batchstyle.run.hooks import hang_if_asked
from batchstyle.run.messages import (
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
from batchstyle.run.plan import Job
from batchstyle.store import StoreError
from batchstyle.version import __version__

# row number, iteration (counted across scales), losses
OnIteration = Callable[[int, int, Losses], None]
Warn = Callable[[str], None]


def describe_failure(job: Job, exc: BaseException, batch: int = 1, image: int = 0) -> str:
    """The row's error, for the ledger and the summary. `image` is the row's place in its batch (for what the batch
    says of each image: `LossNotFinite`)."""
    where = f"row {job.row.number}"
    if isinstance(exc, (ImageError, StoreError)):
        return f"{where}: {exc}"
    if isinstance(exc, LossNotFinite):
        return f"{where}: {exc.describe(image)}"
    if isinstance(exc, OSError) and exc.errno in _WRITE_FIXES and exc.errno not in (errno.EACCES, errno.EPERM):
        # Only ever met writing (a clip's frames, a temp file): the file the user knows is the one it was to become.
        name = Path(exc.filename) if exc.filename else job.output
        return describe_write_failure(job, exc, temp_file_target(name) if is_temp_file(name) else name)
    if is_out_of_memory(exc):
        lower = "lower --batch-size or size" if batch > 1 else "lower size for this row"
        return (
            f"{where}: out of memory at size {job.settings.size} ({exc.__class__.__name__}); {lower} "
            "or use a device with more memory"
        )
    tail = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" at {Path(tail[0].filename).name}:{tail[0].lineno}" if tail else ""
    return f"{where} ({job.row.content.name}): {exc.__class__.__name__}: {exc}{at}"


_FULL = "free space there or give the run another --out"
_NOT_WRITABLE = "give the run an --out folder it can write to"
# What a user does about an output that could not be written, by errno.
_WRITE_FIXES = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.ENAMETOOLONG: "give the row a shorter output name",
    errno.EROFS: _NOT_WRITABLE,
    errno.EACCES: _NOT_WRITABLE,
    errno.EPERM: _NOT_WRITABLE,
    errno.EFBIG: "lower size for this row, or write it to another file system",
    errno.EISDIR: "move that folder away, or give the row another output name",
}


def describe_write_failure(job: Job, exc: OSError, path: Path) -> str:
    """`row 3: cannot write out/x.png: no space left on device (12 MB free in out); free space there or ...`: one
    line with what a user can do, for an output (or its iterates, or a clip's frames) the system would not take."""
    what = (exc.strerror or str(exc)).lower()
    folder = path.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what += f" ({free_space(folder)} in {folder})"
    elif exc.errno == errno.ENAMETOOLONG:
        longest = max(len(os.fsencode(part)) for part in path.parts)  # the file's name, or its iterates folder's
        what += f" (a name of {longest} bytes{_name_max(folder)})"
    fix = _WRITE_FIXES.get(exc.errno or 0, f"check the output folder {folder}")
    return f"row {job.row.number}: cannot write {path}: {what}; {fix}"


def _name_max(folder: Path) -> str:
    for where in (folder, *folder.parents):
        try:
            return f"; names there hold at most {os.pathconf(where, 'PC_NAME_MAX')} bytes"
        except (OSError, ValueError):
            continue
    return ""


# Errors about the row's own names: an output name its folder cannot hold, a path that is a folder, a file too large.
_ROW_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.EFBIG})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# Errors of the device and its libraries (a fault that poisons a CUDA context is a DeviceFault, seen before this).
_DEVICE_WORDS = re.compile(
    r"\b(cuda|cudnn|cublas|cufft|curand|nccl|nvrtc|driver|rocm|hip|mps|xpu|onednn|mkldnn)\b",
    re.IGNORECASE,
)


def failure_cause(job: Job, exc: BaseException) -> str | None:
    """A short signature of a failure that is not the row's own, None when it is the row's own.

    Not the row's own: what would fail any row on this worker. The parent opened every input while checking the
    manifest, so a file this worker cannot open or read (permission denied, gone, an I/O error, no file descriptor
    left) tells about the worker's view of the disk, not the file; so do import errors, ONNX Runtime failures and
    device or driver errors. The row's own: a corrupt or undecodable image, a decompression bomb, out of memory at
    its size, a bad value, a name its folder cannot hold. Neither: a full disk (`full_folder`). The signature leaves
    the row's paths out, so the same cause on different rows compares equal; the engine takes a slot out after a run
    of them (SLOT_FAILURES).
    """
    if is_out_of_memory(exc):
        return None
    if isinstance(exc, ImageError):
        # load_image wraps what went wrong; decoding errors (Pillow's OSErrors carry no errno) are the file's.
        exc = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        if not isinstance(exc, OSError):
            return None
    if isinstance(exc, OSError):
        if exc.errno is None or exc.errno in _ROW_ERRNOS or exc.errno in _FULL_ERRNOS:
            return None
        return f"{exc.__class__.__name__}: [Errno {exc.errno}] {exc.strerror or os.strerror(exc.errno)}"
    kind = type(exc)
    environmental = (
        isinstance(exc, (ImportError, sqlite3.Error))
        or (kind.__module__.startswith("onnxruntime") and kind.__name__ != "InvalidArgument")
        or (isinstance(exc, RuntimeError) and _DEVICE_WORDS.search(str(exc)) is not None)
    )
    if not environmental:
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for path in (job.row.content, *job.row.styles, job.row.init_image, job.output):
        if path is not None:
            text = text.replace(str(path), "<file>").replace(Path(path).name, "<file>")
    return f"{kind.__name__}: {text}"[:200]


def full_folder(job: Job, exc: BaseException) -> Path | None:
    """The folder that had no room left for what the row wrote (no space, or the user's quota spent), or None.

    A full disk is the folder's trouble, neither the row's nor its slot's. Counted against the slot, three rows in a
    row took it out of the run and failed every row left with "every worker was taken out"; the parent stops the
    run instead, and the rows left stay to do for the same command once there is room."""
    if isinstance(exc, ImageError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    if not isinstance(exc, OSError) or exc.errno not in _FULL_ERRNOS:
        return None
    return Path(exc.filename).parent if exc.filename else job.output.parent


def failed(job: Job, exc: BaseException, seconds: float, batch: int = 1) -> Result:
    """The row's failure on `exc`, and whose it is: the row's own, its slot's (`cause`), or its disk's (`full`)."""
    return Result(
        job.row.number,
        "failed",
        seconds,
        error=describe_failure(job, exc, batch),
        cause=failure_cause(job, exc),
        full=full_folder(job, exc),
    )


# A row's output (or iterates) the file system would not take: (error, cause, full) as `failed` makes them, kept
# rather than the exception, whose traceback would hold the batch's frames and tensors.
_WriteFailure = tuple[str, str | None, Path | None]


def _write_failure(job: Job, exc: OSError, path: Path) -> _WriteFailure:
    return describe_write_failure(job, exc, path), failure_cause(job, exc), full_folder(job, exc)


class Worker:
    """Turns batches of jobs into output files: decodes each row's images, hands the batch to the model layer's
    `Stylizer` (which owns the whole algorithm), and writes each output with its metadata."""

    def __init__(self, stylizer: Stylizer, save_every: int = 0, cache_dir: Path | None = None) -> None:
        self.stylizer = stylizer
        self.save_every = save_every
        self.cache_dir = cache_dir  # where a clip's optical flows are kept

    @property
    def device(self) -> torch.device:
        return self.stylizer.device

    @property
    def weights(self) -> Weights:
        return self.stylizer.weights

    @classmethod
    def build(cls, spec: WorkerSpec, warn: Warn, weights: Weights | None = None, fetch: bool = False) -> Worker:
        """A worker in this process, from names: what a spawned process or a Ray actor calls first. The parent's
        own worker may pass the weights it already holds. `fetch`: weights not in the cache are fetched and verified
        here (a Ray actor, whose node may hold no copy of what the driver fetched); a local worker's parent fetched
        them into the one cache they share."""
        if spec.threads:
            torch.set_num_threads(spec.threads)
        if spec.node_cache:
            spec = dataclasses.replace(spec, cache_dir=default_cache_dir())
        if weights is None:
            source, _ = resolve(spec.model, spec.cache_dir)
            weights = source.load(spec.cache_dir, fetch=fetch)
        stylizer = build_stylizer(
            weights,
            torch.device(spec.device),
            spec.cache_dir,
            spec.precision,
            warn,
            targets=spec.targets,
            trt_fp16=spec.trt_fp16,
            profile=spec.profile,
            torch_graphs=spec.torch_targets,
            max_memory=spec.max_memory,
            tile=spec.tile,
            scratch=spec.scratch,
            tile_devices=spec.tile_devices,
            shared_cache=spec.shared_cache,
        )
        return cls(stylizer, spec.save_every, spec.cache_dir)

    def close(self) -> None:
        self.stylizer.targets.close()

    def _precision_measured(self) -> str | None:
        decision = self.stylizer.precision_decision
        return decision.describe() if decision is not None and decision.seconds else None

    def beat_with(self, beat: Callable[[str], None]) -> None:
        """Report a sign of life before and after every target lookup: each scale starts with its targets, which at
        a large size (or while TensorRT builds an engine) take long with no iteration to report."""
        self.stylizer.targets = _BeatingTargets(self.stylizer.targets, beat)  # type: ignore[assignment]

    def run(self, job: Job, on_iteration: OnIteration | None = None) -> Result:
        return self.run_batch([job], on_iteration)[0]

    def run_batch(self, jobs: Sequence[Job], on_iteration: OnIteration | None = None) -> list[Result]:
        """Results in the order of `jobs`. A row whose files cannot be read fails alone; the rest of the batch runs.
        A batch that runs out of memory is retried one row at a time before any row is called failed."""
        start = time.perf_counter()
        results: dict[int, Result] = {}
        prepared: list[tuple[Job, Inputs]] = []
        for job in jobs:
            if job.clip is not None:  # batches never mix a clip with anything (plan.batch_key)
                results[job.row.number] = self._clip(job, on_iteration)
                continue
            try:
                prepared.append((job, inputs_of(job)))
            except Exception as exc:  # noqa: BLE001 - a row's failure is recorded, never fatal to the run
                results[job.row.number] = failed(job, exc, time.perf_counter() - start)
        if prepared:
            try:
                for result in self._stylize(prepared, on_iteration, start):
                    results[result.row] = result
            except Exception as exc:  # noqa: BLE001
                if is_device_fault(exc, self.device):
                    raise DeviceFault(f"{exc.__class__.__name__}: {exc}") from exc
                if len(prepared) > 1 and is_out_of_memory(exc):
                    del exc  # its traceback holds the batch's tensors
                    empty_cache(self.device)
                    for job, _ in prepared:
                        results[job.row.number] = self.run(job, on_iteration)
                elif isinstance(exc, LossNotFinite):
                    # Those images fail; the others' losses were finite, and each gets the result it would get
                    # alone, so they run again, together, without them.
                    rest = []
                    for b, (job, _) in enumerate(prepared):
                        if b in exc.images:
                            error = describe_failure(job, exc, len(prepared), b)
                            results[job.row.number] = Result(
                                job.row.number, "failed", time.perf_counter() - start, error=error
                            )
                        else:
                            rest.append(job)
                    del exc  # its traceback holds the batch's tensors
                    for result in self.run_batch(rest, on_iteration) if rest else []:
                        results[result.row] = result
                else:
                    for job, _ in prepared:
                        results[job.row.number] = failed(job, exc, time.perf_counter() - start, len(prepared))
        return [results[job.row.number] for job in jobs]

    def _clip(self, job: Job, on_iteration: OnIteration | None) -> Result:
        """A clip row (or chunk), frame by frame (`batchstyle.run.clip`); its frames are its output here, and the
        parent assembles the video once every chunk is done."""
        from batchstyle.run.clip import run_clip

        start = time.perf_counter()
        progress = None if on_iteration is None else (lambda i, losses: on_iteration(job.row.number, i, losses))
        try:
            last, frames, iterations = run_clip(self.stylizer, job, self.cache_dir, progress)
        except Exception as exc:  # noqa: BLE001 - a clip's failure is its row's, never the run's
            if is_device_fault(exc, self.device):
                raise DeviceFault(f"{exc.__class__.__name__}: {exc}") from exc
            return failed(job, exc, time.perf_counter() - start)
        return Result(
            job.row.number,
            "done",
            time.perf_counter() - start,
            iterations,
            last.losses if last is not None else None,
            history=last.history if last is not None else [],
            targets=last.targets if last is not None else None,
            provider=self.stylizer.provider(job.settings),
            scales=last.scales if last is not None else [],
            stops=last.stops if last is not None else [],
            colours=list(last.colours) if last is not None else [],
            faces=found_faces(last) if last is not None else None,
            precision=self.stylizer.precision,
            precision_measured=self._precision_measured(),
            frames=frames,
        )

    def _stylize(self, batch: list[tuple[Job, Inputs]], on_iteration: OnIteration | None, start: float) -> list[Result]:
        jobs = [job for job, _ in batch]
        settings = jobs[0].settings
        snapshot_failures: dict[int, _WriteFailure] = {}  # its iterates not written
        hooks = Hooks(
            on_iteration=None if on_iteration is None else _batch_progress(on_iteration, jobs),
            on_snapshot=self._snapshot(jobs, snapshot_failures) if self.save_every else None,
            snapshot_every=self.save_every,
        )
        stylized = self.stylizer.stylize([inputs for _, inputs in batch], settings, hooks)
        provider = self.stylizer.provider(settings)
        results = []
        for job, out in zip(jobs, stylized):
            # Each output is written on its own: one the file system will not take (a full disk, a name too long)
            # fails its row, and the rows written before and after it stand.
            failure = snapshot_failures.get(job.row.number)
            if failure is None:
                url = job.row.output_url
                local = job.output if url is None else store.output_copy(url)
                try:
                    local.parent.mkdir(parents=True, exist_ok=True)
                    pixels = tensor_to_deep(out.image) if settings.bit_depth == 16 else tensor_to_image(out.image)
                    save_image_atomic(pixels, local, self.metadata(job, out, len(batch)))
                    if url is not None:
                        put_output(local, url)
                except OSError as exc:
                    failure = _write_failure(job, exc, local)
                except StoreError as exc:
                    failure = f"row {job.row.number}: cannot put the output to {exc}", None, None
            if failure is not None:
                error, cause, full = failure
                seconds = time.perf_counter() - start
                results.append(Result(job.row.number, "failed", seconds, error=error, cause=cause, full=full))
                continue
            results.append(
                Result(
                    job.row.number,
                    "done",
                    time.perf_counter() - start,
                    out.iterations,
                    out.losses,
                    history=out.history,
                    targets=out.targets,
                    provider=provider,
                    scales=out.scales,
                    stops=out.stops,
                    colours=list(out.colours),
                    faces=found_faces(out),
                    batch=len(batch),
                    precision=self.stylizer.precision,
                    precision_measured=self._precision_measured(),
                    tiling=[(t.tile, t.history, t.store, t.devices) for t in out.tilings],
                    memory_budget=self.stylizer.memory.budget,
                )
            )
        return results

    @staticmethod
    def _snapshot(jobs: list[Job], failures: dict[int, _WriteFailure]) -> Callable[[int, int, torch.Tensor], None]:
        """Iterates go to `<output stem>.iterates/`: a folder of their own, so nothing mistakes one for an output. A
        row whose iterates cannot be written fails (asked for, not given) and writes no more of them; the other rows
        of its batch go on.

        With a URL --out each is written in this node's staging area (beside `store.output_copy`'s file: the output
        folder is the driver's, which a Ray actor on another node may not reach) and put to the same name under the
        out prefix in one put, so each iterate's object is whole; the local copy then goes."""

        def save(scale: int, iteration: int, pixels: torch.Tensor) -> None:
            for job, image in zip(jobs, pixels.split(1)):
                if job.row.number in failures:
                    continue
                url = job.row.output_url
                folder = iterates_folder(job.output if url is None else store.output_copy(url))
                path = folder / f"scale{scale}-iter{iteration:05d}{job.output.suffix}"
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    save_image_atomic(
                        tensor_to_image(image), path, {"batchstyle:iterate": f"scale {scale}, iteration {iteration}"}
                    )
                    if url is not None:
                        put_output(path, iterates_url(url, path.name))
                except OSError as exc:
                    failures[job.row.number] = _write_failure(job, exc, path)
                except StoreError as exc:
                    failures[job.row.number] = f"row {job.row.number}: cannot put an iterate to {exc}", None, None

        return save

    def metadata(self, job: Job, out: Stylized, batch: int = 1) -> dict[str, str]:
        """Enough to know, from the file alone, how it was made and to make it again."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in job.settings.as_dict().items()}
        params["scales"] = [list(scale) for scale in out.scales]
        params["colours"] = list(out.colours)  # what color=auto chose, per style
        if out.faces is not None:
            params["faces_found"] = found_faces(out)  # what faces=auto found: [x, y, w, h] as fractions
        return {
            "Software": f"batchstyle {__version__}",
            "batchstyle:content": job.row.content.name,
            "batchstyle:styles": ";".join(p.name for p in job.row.styles),
            "batchstyle:style_blend_weights": ";".join(f"{w:g}" for w in job.row.blend),
            "batchstyle:params": json.dumps(params, sort_keys=True),
            "batchstyle:model": self.weights.source.name,
            "batchstyle:weights": self.weights.sha256,
            "batchstyle:seed": str(job.settings.seed),
            "batchstyle:losses": json.dumps(out.losses.as_dict()),
            "batchstyle:key": job.key,
            "batchstyle:device": str(self.device),
            "batchstyle:precision": self.stylizer.precision,
            "batchstyle:batch": str(batch),
        }


def found_faces(out: Stylized) -> list[list[float]] | None:
    """The faces a row's content held on, as recorded: [x, y, width, height] as fractions of the content's size;
    None where none were looked for (faces=off, or a content_mask given)."""
    return None if out.faces is None else [face.as_list() for face in out.faces]


def put_output(local: Path, url: str) -> None:
    """The finished output to its URL in one put, before the row is reported done; the local copy then goes."""
    store.put(local, url)
    local.unlink()


def inputs_of(job: Job) -> Inputs:
    """A row's images, decoded, addressed in the target cache by their files' sha256 (the job's digests), each read
    on this node (`Row.on_this_node`)."""
    row = job.row

    def read(path: Path) -> Any:
        return load_image(row.on_this_node(path))

    return Inputs(
        content=read(row.content),
        styles=[read(path) for path in row.styles],
        blend=row.blend,
        init=read(row.init_image) if row.init_image else None,
        style_masks=[read(Path(mask)) for mask in job.settings.style_masks],
        content_mask=read(Path(job.settings.content_mask)) if job.settings.content_mask else None,
        content_id=job.content_digest,
        style_ids=job.style_digests,
    )


def _batch_progress(callback: OnIteration, jobs: list[Job]) -> Callable[[int, list[Losses]], None]:
    def report(iteration: int, losses: list[Losses]) -> None:
        for job, loss in zip(jobs, losses):
            callback(job.row.number, iteration, loss)

    return report


# -- a worker process ----------------------------------------------------------------------------------------------


PROGRESS_INTERVAL = 0.25  # seconds between progress messages from a worker process: enough for a live bar


class _Throttled:
    """Progress of a batch, sent to the parent at most every PROGRESS_INTERVAL: the latest iteration per row.

    Every message doubles as a heartbeat: the parent takes a worker silent for --stall-timeout as hung. Iterations
    are not the only work, so `beat` also says when a batch starts and when the worker passes from phase to phase
    (computing a scale's targets, working on), each phase change at once and otherwise throttled like progress.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.last = 0.0
        self.phase = "idle"
        self.pending: dict[int, RowProgress] = {}

    def start(self) -> _Throttled:
        self.pending = {}
        self.beat("started")
        return self

    def __call__(self, row: int, iteration: int, losses: Losses) -> None:
        self.pending[row] = RowProgress(iteration, losses.as_dict())
        self.phase = "working"
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.conn.send(Progress(self.pending))
            self.pending = {}

    def beat(self, phase: str) -> None:
        now = time.monotonic()
        if phase != self.phase or now - self.last >= PROGRESS_INTERVAL:
            self.phase, self.last = phase, now
            self.conn.send(Beat(phase))


class _BeatingTargets:
    """A worker's target store that beats before and after each lookup: every scale starts with its targets, which
    at a large size (or while TensorRT builds an engine) take long with no iteration to report."""

    def __init__(self, store: Any, beat: Callable[[str], None]) -> None:
        self._store, self._beat = store, beat

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self._beat("targets")
        found = self._store.get(*args, **kwargs)
        self._beat("working")
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def serve(conn: Any, spec: WorkerSpec) -> None:
    """Main loop of a spawned worker process: build the worker, then run each batch the parent sends.

    Ctrl-C reaches the whole process group; the worker ignores it and lets the parent decide (finish the row, or
    stop it). Anything that kills this process mid-row is seen by the parent, which hands the row out again.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent until ignored here

    def warn(text: str) -> None:
        conn.send(Note(text))

    try:
        worker = Worker.build(spec, warn)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides what the run does
        conn.send(Fatal(f"worker on {spec.device} could not start: {exc.__class__.__name__}: {exc}"))
        return
    progress = _Throttled(conn)
    worker.beat_with(progress.beat)
    conn.send(Ready(os.getpid()))
    try:
        while True:
            match conn.recv():
                case Stop():
                    break
                case RunBatch(jobs=jobs):
                    on_iteration = progress.start()
                    hang_if_asked(jobs)
                    try:
                        results = worker.run_batch(jobs, on_iteration)
                    except DeviceFault as exc:
                        # The cause goes first: a slot whose device keeps faulting is taken out of the run.
                        conn.send(Fault(f"DeviceFault: {(str(exc).splitlines() or [''])[0]}"[:200]))
                        conn.send(Note(f"worker on {spec.device}: {exc}; replacing it"))
                        worker.close()
                        os._exit(DEVICE_FAULT_EXIT)
                    conn.send(Results(tuple(results)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away or is stopping: nothing left to report to
    finally:
        worker.close()
