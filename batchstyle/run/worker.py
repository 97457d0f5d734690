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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchstyle.images import (
    ImageError,
    image_to_tensor,
    load_image,
    luminance_image,
    recombine_color,
    resize_long_side,
    save_image_atomic,
    tensor_to_image,
)
from batchstyle.model.export import GraphSpec
from batchstyle.model.features import VGGFeatures
from batchstyle.model.optimize import Losses, stylize_batch, upsample
from batchstyle.model.scales import style_long_side
from batchstyle.model.targets import (
    OrtBackend,
    TargetCache,
    Targets,
    TargetStore,
    TorchBackend,
    blend_grams,
    stack_targets,
)
from batchstyle.model.weights import Weights, resolve
from batchstyle.options import Settings
from batchstyle.run.devices import DEVICE_FAULT_EXIT, DeviceFault, configure_device, is_device_fault, is_out_of_memory
from batchstyle.run.plan import Job, graph_spec
from batchstyle.version import __version__

# row number, iteration (counted across scales), losses
OnIteration = Callable[[int, int, Losses], None]
Warn = Callable[[str], None]


@dataclass
class Result:
    row: int
    status: str  # done | failed
    seconds: float
    iterations: int = 0
    losses: Losses | None = None
    error: str | None = None
    history: list[Losses] = field(default_factory=list)
    targets: str | None = None  # where the targets came from, e.g. "content=hit style=miss,hit"
    provider: str | None = None
    scales: list[tuple[int, int, int]] = field(default_factory=list)  # (width, height, iterations) per scale
    batch: int = 1  # images optimised together with this one
    cause: str | None = None  # a failure that is not the row's own: a signature without the row's paths


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
    precision: str = "fp32"  # fp32 | tf32 | bf16 (tf32 and bf16 only change anything on CUDA)
    threads: int | None = None  # torch (and ORT) threads; None leaves the process default


def describe_failure(job: Job, exc: BaseException, batch: int = 1) -> str:
    where = f"row {job.row.number}"
    if isinstance(exc, ImageError):
        return f"{where}: {exc}"
    if is_out_of_memory(exc):
        lower = "lower --batch-size or size" if batch > 1 else "lower size for this row"
        return (
            f"{where}: out of memory at size {job.settings.size} ({exc.__class__.__name__}); {lower} "
            "or use a device with more memory"
        )
    tail = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" at {Path(tail[0].filename).name}:{tail[0].lineno}" if tail else ""
    return f"{where} ({job.row.content.name}): {exc.__class__.__name__}: {exc}{at}"


# Errors about the row's own names: an output name its folder cannot hold, a path that is a folder, a file too large.
_ROW_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.EFBIG})
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
    its size, a bad value, a name its folder cannot hold. The signature leaves the row's paths out, so the same
    cause on different rows compares equal; the engine takes a slot out after a run of them (SLOT_FAILURES).
    """
    if is_out_of_memory(exc):
        return None
    if isinstance(exc, ImageError):
        # load_image wraps what went wrong; decoding errors (Pillow's OSErrors carry no errno) are the file's.
        exc = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        if not isinstance(exc, OSError):
            return None
    if isinstance(exc, OSError):
        if exc.errno is None or exc.errno in _ROW_ERRNOS:
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


def backend_factory(
    weights: Weights, spec: WorkerSpec, device: torch.device, warn: Warn
) -> Callable[[GraphSpec], TorchBackend | OrtBackend]:
    """How this worker opens each target graph: ONNX Runtime on the graphs the parent exported, torch otherwise."""
    use_ort = spec.targets == "ort"
    if use_ort:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            warn(
                "onnxruntime is not installed: targets are computed with torch "
                "(pip install 'batchstyle[cpu]', or 'batchstyle[gpu]' on a GPU host, to use ONNX Runtime)"
            )
            use_ort = False
    if not use_ort:
        return lambda graph: TorchBackend(weights, graph, device)
    seen: set[str] = set()

    def make(graph: GraphSpec) -> TorchBackend | OrtBackend:
        path = spec.cache_dir / "onnx" / graph.filename()
        if graph in spec.torch_targets:
            return TorchBackend(weights, graph, device)
        if not path.is_file():
            # A node that does not share the parent's cache folder (Ray): targets are right either way.
            warn(f"{path} is not on this node: targets are computed with torch; share --cache-dir to use ONNX Runtime")
            return TorchBackend(weights, graph, device)
        backend = OrtBackend(
            path,
            graph,
            weights.arch,
            device,
            spec.cache_dir,
            spec.trt_fp16,
            spec.profile,
            warn=warn,
        )
        if backend.provider not in seen:
            seen.add(backend.provider)
            warn(f"targets: ONNX Runtime on {backend.provider}")
        return backend

    return make


@dataclass
class _Prepared:
    """One job's inputs, decoded once for all its scales."""

    job: Job
    content: Any
    styles: list[Any]
    init: torch.Tensor | None
    hits: list[str] = field(default_factory=list)
    original: torch.Tensor | None = None


class Worker:
    """Holds the weights, one trunk per tap set and a target store, and turns jobs into output files."""

    def __init__(
        self,
        weights: Weights,
        device: torch.device,
        targets: TargetStore,
        save_every: int = 0,
        precision: str = "fp32",
    ) -> None:
        self.weights = weights
        self.device = device
        self.targets = targets
        self.save_every = save_every
        self.precision = precision
        self._models: dict[tuple[tuple[str, ...], str], VGGFeatures] = {}

    @classmethod
    def build(cls, spec: WorkerSpec, warn: Warn, weights: Weights | None = None) -> Worker:
        """A worker in this process, from names: what a spawned process or a Ray actor calls first. The parent's
        own worker may pass the weights it already holds."""
        if spec.threads:
            torch.set_num_threads(spec.threads)
        device = torch.device(spec.device)
        configure_device(device, spec.precision)
        if weights is None:
            source, _ = resolve(spec.model, spec.cache_dir)
            weights = source.load(spec.cache_dir, fetch=False)
        try:
            cache: TargetCache | None = TargetCache(spec.cache_dir)
        except (OSError, sqlite3.Error) as exc:
            warn(f"no target cache ({exc}): every target is computed")
            cache = None
        precision = "trt-fp16" if spec.trt_fp16 and spec.targets == "ort" else "fp32"
        store = TargetStore(backend_factory(weights, spec, device, warn), cache, precision, warn)
        return cls(weights, device, store, spec.save_every, spec.precision)

    def close(self) -> None:
        if self.targets.cache is not None:
            self.targets.cache.close()

    def model(self, settings: Settings) -> VGGFeatures:
        taps = tuple(dict.fromkeys((*settings.content_layers, *settings.style_layers)))
        key = (taps, settings.pooling)
        if key not in self._models:
            w = self.weights
            # Channels-last is cuDNN's tensor-core layout, and oneDNN's too: ~8% off every iteration on CPU as well.
            self._models[key] = VGGFeatures(
                w.arch, w.state_dict, w.preprocess, taps, settings.pooling, channels_last=True
            ).to(self.device)
        return self._models[key]

    def run(self, job: Job, on_iteration: OnIteration | None = None) -> Result:
        return self.run_batch([job], on_iteration)[0]

    def run_batch(self, jobs: Sequence[Job], on_iteration: OnIteration | None = None) -> list[Result]:
        """Results in the order of `jobs`. A row whose files cannot be read fails alone; the rest of the batch runs.
        A batch that runs out of memory is retried one row at a time before any row is called failed."""
        start = time.perf_counter()
        results: dict[int, Result] = {}
        prepared: list[_Prepared] = []
        for job in jobs:
            try:
                prepared.append(self._prepare(job))
            except Exception as exc:  # noqa: BLE001 - a row's failure is recorded, never fatal to the run
                results[job.row.number] = Result(
                    job.row.number,
                    "failed",
                    time.perf_counter() - start,
                    error=describe_failure(job, exc),
                    cause=failure_cause(job, exc),
                )
        if prepared:
            try:
                for result in self._stylize(prepared, on_iteration, start):
                    results[result.row] = result
            except Exception as exc:  # noqa: BLE001
                if is_device_fault(exc, self.device):
                    raise DeviceFault(f"{exc.__class__.__name__}: {exc}") from exc
                if len(prepared) > 1 and is_out_of_memory(exc):
                    del exc  # its traceback holds the batch's tensors
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    for p in prepared:
                        results[p.job.row.number] = self.run(p.job, on_iteration)
                else:
                    for p in prepared:
                        results[p.job.row.number] = Result(
                            p.job.row.number,
                            "failed",
                            time.perf_counter() - start,
                            error=describe_failure(p.job, exc, len(prepared)),
                            cause=failure_cause(p.job, exc),
                        )
        return [results[job.row.number] for job in jobs]

    def _prepare(self, job: Job) -> _Prepared:
        init = image_to_tensor(load_image(job.row.init_image)).to(self.device) if job.row.init_image else None
        return _Prepared(job, load_image(job.row.content), [load_image(p) for p in job.row.styles], init)

    def _targets(self, p: _Prepared, spec: GraphSpec, size: int) -> tuple[torch.Tensor, torch.Tensor | None, Targets]:
        """Content pixels, init and targets of one job at one scale (luminance-only under preserve_color)."""
        s, job, dev = p.job.settings, p.job, self.device
        content = image_to_tensor(resize_long_side(p.content, size)).to(dev)
        style_size = style_long_side(size, s.style_scale)
        styles = [image_to_tensor(resize_long_side(st, style_size)).to(dev) for st in p.styles]
        p.original, init = content, p.init
        content_variant, style_variant = "rgb", "rgb"
        if s.preserve_color:
            # Luminance-only transfer (Gatys et al. 2016): style the Y channel, keep the content's chroma.
            styles = [luminance_image(st, match=content) for st in styles]
            content = luminance_image(content)
            init = luminance_image(init) if init is not None else None
            h, w = content.shape[-2:]
            content_variant, style_variant = "luma", f"luma-matched:{job.content_digest}:{w}x{h}"
        content_targets, content_hit = self.targets.get(spec, "content", job.content_digest, content_variant, content)
        grams, style_hits = [], []
        for digest, pixels in zip(job.style_digests, styles):
            found, hit = self.targets.get(spec, "style", digest, style_variant, pixels)
            grams.append(found)
            style_hits.append(hit)
        p.hits.append(f"content={_hit(content_hit)} style={','.join(_hit(h) for h in style_hits)}")
        return content, init, Targets(content_targets, blend_grams(grams, job.row.blend))

    def _stylize(self, batch: list[_Prepared], on_iteration: OnIteration | None, start: float) -> list[Result]:
        first = batch[0].job
        s = first.settings
        spec = graph_spec(self.weights.source, s)
        model = self.model(s)
        image: torch.Tensor | None = None
        histories: list[list[Losses]] = [[] for _ in batch]
        scales: list[tuple[int, int, int]] = []
        done_before = 0
        for k, (size, iterations) in enumerate(first.scales()):
            per_job = [self._targets(p, spec, size) for p in batch]
            contents = torch.cat([content for content, _, _ in per_job])
            targets = stack_targets([t for _, _, t in per_job])
            outcomes = stylize_batch(
                model,
                contents,
                targets,
                dataclasses.replace(s, size=size, iterations=iterations),
                [init for _, init, _ in per_job],
                None if on_iteration is None else _batch_progress(on_iteration, batch, done_before),
                starts=None if image is None else upsample(image, contents),
                on_snapshot=self._snapshot(batch, k),
                snapshot_every=self.save_every,
                precision=self.precision,
            )
            image = torch.cat([o.image for o in outcomes])
            for history, outcome in zip(histories, outcomes):
                history += outcome.history
            done_before += iterations
            scales.append((contents.shape[-1], contents.shape[-2], iterations))
        results = []
        for p, outcome, history in zip(batch, outcomes, histories):
            job = p.job
            assert p.original is not None
            result_image = recombine_color(outcome.image, p.original) if s.preserve_color else outcome.image
            job.output.parent.mkdir(parents=True, exist_ok=True)
            save_image_atomic(
                tensor_to_image(result_image), job.output, self.metadata(job, outcome.losses, scales, len(batch))
            )
            results.append(
                Result(
                    job.row.number,
                    "done",
                    time.perf_counter() - start,
                    done_before,
                    outcome.losses,
                    history=history,
                    targets=" | ".join(p.hits),
                    provider=self.targets.provider(spec),
                    scales=scales,
                    batch=len(batch),
                )
            )
        return results

    def _snapshot(self, batch: list[_Prepared], scale: int) -> Callable[[int, torch.Tensor], None] | None:
        """Iterates go to `<output stem>.iterates/`: a folder of their own, so nothing mistakes one for an output."""
        if not self.save_every:
            return None

        def save(iteration: int, pixels: torch.Tensor) -> None:
            for p, image in zip(batch, pixels.split(1)):
                job = p.job
                assert p.original is not None
                if job.settings.preserve_color:
                    image = recombine_color(image, p.original)
                folder = job.output.parent / f"{job.output.stem}.iterates"
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"scale{scale}-iter{iteration:05d}{job.output.suffix}"
                save_image_atomic(
                    tensor_to_image(image), path, {"batchstyle:iterate": f"scale {scale}, iteration {iteration}"}
                )

        return save

    def metadata(self, job: Job, losses: Losses, scales: list[tuple[int, int, int]], batch: int = 1) -> dict[str, str]:
        """Enough to know, from the file alone, how it was made and to make it again."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in job.settings.as_dict().items()}
        params["scales"] = [list(scale) for scale in scales]
        return {
            "Software": f"batchstyle {__version__}",
            "batchstyle:content": job.row.content.name,
            "batchstyle:styles": ";".join(p.name for p in job.row.styles),
            "batchstyle:style_blend_weights": ";".join(f"{w:g}" for w in job.row.blend),
            "batchstyle:params": json.dumps(params, sort_keys=True),
            "batchstyle:model": self.weights.source.name,
            "batchstyle:weights": self.weights.sha256,
            "batchstyle:seed": str(job.settings.seed),
            "batchstyle:losses": json.dumps(losses.__dict__),
            "batchstyle:key": job.key,
            "batchstyle:device": str(self.device),
            "batchstyle:precision": self.precision,
            "batchstyle:batch": str(batch),
        }


def _batch_progress(callback: OnIteration, batch: list[_Prepared], offset: int) -> Callable[[int, list[Losses]], None]:
    """Iterations count across scales, so one progress bar covers a whole row."""

    def report(iteration: int, losses: list[Losses]) -> None:
        for p, loss in zip(batch, losses):
            callback(p.job.row.number, offset + iteration, loss)

    return report


def _hit(flag: bool) -> str:
    return "hit" if flag else "miss"


# -- a worker process ----------------------------------------------------------------------------------------------


PROGRESS_INTERVAL = 0.25  # seconds between progress messages from a worker process: enough for a live bar


class _Throttled:
    """Progress of a batch, sent to the parent at most every PROGRESS_INTERVAL: the latest iteration per row.

    Every message doubles as a heartbeat: the parent takes a worker silent for --stall-timeout as hung. Iterations
    are not the only work, so `beat` also says when a batch starts and when the worker passes from phase to phase
    (computing a scale's targets, working on), each phase change at once and otherwise throttled like progress.
    """

    def __init__(self, conn: Any, batch_id: int = 0) -> None:
        self.conn, self.batch_id = conn, batch_id
        self.last = 0.0
        self.phase = "idle"
        self.pending: dict[int, tuple[int, dict[str, float]]] = {}

    def start(self, batch_id: int) -> _Throttled:
        self.batch_id, self.pending = batch_id, {}
        self.beat("started")
        return self

    def __call__(self, row: int, iteration: int, losses: Losses) -> None:
        self.pending[row] = (iteration, losses.__dict__)
        self.phase = "working"
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.conn.send(("progress", self.batch_id, self.pending))
            self.pending = {}

    def beat(self, phase: str) -> None:
        now = time.monotonic()
        if phase != self.phase or now - self.last >= PROGRESS_INTERVAL:
            self.phase, self.last = phase, now
            self.conn.send(("beat", self.batch_id, phase))


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
        conn.send(("message", text))

    try:
        worker = Worker.build(spec, warn)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides what the run does
        conn.send(("fatal", f"worker on {spec.device} could not start: {exc.__class__.__name__}: {exc}"))
        return
    progress = _Throttled(conn)
    worker.targets = _BeatingTargets(worker.targets, progress.beat)
    conn.send(("ready", os.getpid()))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, batch_id, jobs = message
            try:
                results = worker.run_batch(jobs, progress.start(batch_id))
            except DeviceFault as exc:
                # The cause goes first: a slot whose device keeps faulting is taken out of the run.
                conn.send(("fault", f"DeviceFault: {(str(exc).splitlines() or [''])[0]}"[:200]))
                conn.send(("message", f"worker on {spec.device}: {exc}; replacing it"))
                worker.close()
                os._exit(DEVICE_FAULT_EXIT)
            conn.send(("results", batch_id, results))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away or is stopping: nothing left to report to
    finally:
        worker.close()
