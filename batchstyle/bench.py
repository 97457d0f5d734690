"""Benchmarks that print figures: how close an optimisation iteration comes to the network's own cost.

The floor is one bare forward+backward of the same truncated trunk at the same size: no iteration can be cheaper,
so the ratio iteration/floor is what the loop's own overhead (losses, Gram matrices, optimiser) costs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from batchstyle.model.export import graph_spec
from batchstyle.model.stylize import Hooks, Inputs, Stylizer
from batchstyle.model.weights import Weights
from batchstyle.options import Settings, default_values, make_settings


@dataclass(frozen=True)
class IterationFigures:
    size: tuple[int, int]
    optimizer: str
    seconds_per_iteration: float
    floor_seconds: float  # at the same precision
    batch: int = 1
    precision: str = "fp32"  # as resolved for the device (auto -> bf16, tf32 or fp32)

    @property
    def ratio(self) -> float:
        return self.seconds_per_iteration / self.floor_seconds


def precisions_to_measure(device: torch.device, asked: str = "auto") -> list[str]:
    """fp32 first (its floor is what every precision is compared with), then the others asked for, resolved for
    `device` and without repeats; `auto` is every precision that can be faster there."""
    from batchstyle.run.devices import precision_for

    names = [name.strip().lower() for name in asked.split(",") if name.strip()]
    unknown = [name for name in names if name not in ("auto", "fp32", "tf32", "bf16")]
    if unknown:
        raise ValueError(f"unknown precision {', '.join(unknown)}: use fp32, tf32, bf16 or auto")
    defaults = {"cuda": ["tf32", "bf16"], "cpu": ["bf16"]}.get(device.type, [])
    found = ["fp32"]
    for name in names:
        for precision in (defaults + [precision_for(device, "auto")]) if name == "auto" else [name]:
            if precision not in found:
                found.append(precision)
    return found


def iteration_header() -> str:
    return (
        f"{'size':>10} {'batch':>5} {'precision':>9} {'s/iteration':>12} {'floor s':>10} {'ratio':>7} "
        f"{'/fp32 floor':>11} {'s/it/image':>11}"
    )


def format_iteration(fig: IterationFigures, fp32_floor: float) -> str:
    """One line of `iteration_header`'s table: the iteration beside its own precision's floor and the fp32 floor."""
    w, h = fig.size
    return (
        f"{f'{w}x{h}':>10} {fig.batch:>5} {fig.precision:>9} {fig.seconds_per_iteration:>12.4f} "
        f"{fig.floor_seconds:>10.4f} {fig.ratio:>7.3f} {fig.seconds_per_iteration / fp32_floor:>11.3f} "
        f"{fig.seconds_per_iteration / fig.batch:>11.4f}"
    )


def _sync(device: torch.device) -> None:
    from batchstyle.run.devices import synchronize

    synchronize(device)


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_image(width: int, height: int, generator: torch.Generator) -> Image.Image:
    """Uniform noise as an RGB image: timing does not depend on what the pixels show."""
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def iteration_figures(
    weights: Weights,
    long_side: int,
    optimizer: str = "lbfgs",
    iterations: int = 10,
    device: str = "cpu",
    batch: int = 1,
    precision: str = "auto",
) -> IterationFigures:
    """Median seconds of one optimisation iteration of a batch of `batch` 4:3 images, and of the bare
    forward+backward floor at the same batch and precision, through the `Stylizer` a worker uses."""
    from batchstyle.run.devices import configure_device, precision_for

    dev = torch.device(device)
    precision = precision_for(dev, precision)
    configure_device(dev, precision)
    settings: Settings = make_settings(
        {
            **default_values(),
            "size": long_side,
            "min_size": 0,
            "optimizer": optimizer,
            "iterations": _loop_iterations(dev, iterations),
        }
    )
    stylizer = Stylizer.local(weights, dev, precision)
    model = stylizer.trunk(settings)
    h, w = long_side * 3 // 4, long_side
    gen = torch.Generator().manual_seed(0)
    items = [Inputs(random_image(w, h, gen), [random_image(w, h, gen)]) for _ in range(batch)]
    pixels = torch.rand(batch, 3, h, w, generator=gen).to(dev).requires_grad_(True)
    net = model.lowered(torch.bfloat16) if precision == "bf16" else model  # as the Objective runs it

    def bare() -> None:
        feats = net(pixels)
        deepest = feats[max(feats, key=lambda name: list(net.layers).index(name))]
        deepest.float().sum().backward()
        pixels.grad = None

    floor = _median_seconds(bare, iterations, dev)
    stamps: dict[int, float] = {}

    def stamp(iteration: int, _: object) -> None:
        _sync(dev)
        stamps[iteration] = time.perf_counter()

    # Timed between iteration callbacks: targets, set-up and the final loss evaluation stay out of the figure.
    stylizer.stylize(items, settings, Hooks(on_iteration=stamp))
    per_iteration = _per_iteration(stamps, dev)
    assert per_iteration is not None  # _loop_iterations runs enough for a gap
    return IterationFigures((w, h), optimizer, per_iteration, floor, batch, precision)


def _loop_iterations(device: torch.device, timed: int) -> int:
    """Iterations to run for `timed` timed ones. On the CPU every iteration reports: one more than timed. On a GPU the
    loop reports in bursts every LOSS_CHUNK iterations, and a burst's reports all come at its end: the first chunk
    (warm-up) and then whole chunks covering `timed`."""
    from batchstyle.model.optimize import LOSS_CHUNK

    if device.type == "cpu":
        return timed + 1
    return LOSS_CHUNK * (1 + -(-timed // LOSS_CHUNK))


def _per_iteration(stamps: dict[int, float], device: torch.device) -> float | None:
    """Seconds per iteration from the times iterations were reported (iteration -> time): the median gap on the CPU;
    on a GPU the time between the ends of the first and the last burst over the iterations between them (the
    iterations inside one burst are reported together, so their gaps mean nothing). None when there is no gap."""
    from batchstyle.model.optimize import LOSS_CHUNK

    done = sorted(stamps)
    if device.type == "cpu":
        return statistics.median(stamps[b] - stamps[a] for a, b in zip(done, done[1:])) if len(done) > 1 else None
    if not done or done[-1] <= LOSS_CHUNK:
        return None  # one burst
    return (stamps[done[-1]] - stamps[LOSS_CHUNK]) / (done[-1] - LOSS_CHUNK)


@dataclass(frozen=True)
class TargetFigures:
    size: tuple[int, int]
    torch_seconds: float
    ort_seconds: float | None
    ort_provider: str | None


def target_figures(
    weights: Weights, long_side: int, cache_dir: Path, repeats: int = 5, device: str = "cpu"
) -> TargetFigures:
    """Median seconds to compute one row's targets (content features of one image, Grams of one style)."""
    from batchstyle.model.export import export_graph, graph_matches
    from batchstyle.model.targets import OrtBackend, TorchBackend

    dev = torch.device(device)
    spec = graph_spec(weights.source, make_settings(default_values()))
    h, w = long_side * 3 // 4, long_side
    gen = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, h, w, generator=gen).to(dev), torch.rand(1, 3, w, w, generator=gen).to(dev)
    torch_backend = TorchBackend(weights, spec, dev)
    torch_s = _median_seconds(lambda: (torch_backend(content), torch_backend(style)), repeats, dev)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return TargetFigures((w, h), torch_s, None, None)
    export_dir = cache_dir / "onnx"
    if not graph_matches(export_dir / spec.filename(), spec):
        export_graph(weights, spec, export_dir)
    ort_backend = OrtBackend(export_dir / spec.filename(), spec, weights.arch, dev, cache_dir)
    ort_s = _median_seconds(lambda: (ort_backend(content), ort_backend(style)), repeats, dev)
    return TargetFigures((w, h), torch_s, ort_s, ort_backend.provider)


@dataclass(frozen=True)
class CacheFigures:
    rows: int
    styles: int
    uncached_seconds: float
    first_run_seconds: float
    rerun_seconds: float
    computed_first: int
    computed_rerun: int


def cache_figures(
    weights: Weights, long_side: int, rows: int, styles: int, backend: str = "torch", device: str = "cpu"
) -> CacheFigures:
    """Target time for a manifest of `rows` distinct contents sharing `styles` styles: no cache, a first run that
    fills the cache, and a rerun that finds everything there."""
    import tempfile

    from batchstyle.model.export import export_graph
    from batchstyle.model.targets import OrtBackend, TargetCache, TargetStore, TorchBackend

    dev = torch.device(device)
    spec = graph_spec(weights.source, make_settings(default_values()))
    h, w = long_side * 3 // 4, long_side
    gen = torch.Generator().manual_seed(1)
    contents = [torch.rand(1, 3, h, w, generator=gen).to(dev) for _ in range(rows)]
    style_images = [torch.rand(1, 3, w, w, generator=gen).to(dev) for _ in range(styles)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if backend == "ort":
            path = export_graph(weights, spec, root / "onnx").path
            make = lambda s: OrtBackend(path, s, weights.arch, dev, root)  # noqa: E731
        else:
            make = lambda s: TorchBackend(weights, s, dev)  # noqa: E731

        def manifest_pass(store: TargetStore) -> float:
            start = time.perf_counter()
            for i, content in enumerate(contents):
                store.get(spec, "content", f"content{i}", "rgb", content)
                store.get(spec, "style", f"style{i % styles}", "rgb", style_images[i % styles])
            _sync(dev)
            return time.perf_counter() - start

        warm = TargetStore(make, None)
        warm.get(spec, "content", "warm", "rgb", contents[0])  # backend creation stays out of the figures
        uncached = TargetStore(lambda s: warm.backend(s), None)
        uncached_s = manifest_pass(uncached)
        cache = TargetCache(root / "cache")
        first = TargetStore(lambda s: warm.backend(s), cache)
        first_s = manifest_pass(first)
        rerun = TargetStore(lambda s: warm.backend(s), cache)
        rerun_s = manifest_pass(rerun)
        cache.close()
    return CacheFigures(rows, styles, uncached_s, first_s, rerun_s, first.computed, rerun.computed)


@dataclass(frozen=True)
class MemoryFigures:
    long_side: int
    scales: tuple[int, ...]
    peak_mib: float  # the process's peak resident memory
    baseline_mib: float  # after loading the weights, before any image
    seconds_per_iteration: float  # at the final scale

    @property
    def working_mib(self) -> float:
        return self.peak_mib - self.baseline_mib


def _memory_child(queue: Any, model: str, cache_dir: str, long_side: int, min_size: int, iterations: int) -> None:
    """`iterations` at the coarser scales; the final scale runs until the L-BFGS history is full, as in a real run."""
    # A fresh process per configuration, so ru_maxrss is this configuration's peak alone.
    import resource

    from batchstyle.model.optimize import lbfgs_history
    from batchstyle.model.scales import scale_sizes
    from batchstyle.model.weights import resolve

    source, _ = resolve(model, Path(cache_dir))
    weights = source.load(Path(cache_dir))
    settings = make_settings({**default_values(), "size": long_side, "min_size": min_size, "iterations": iterations})
    stylizer = Stylizer.local(weights, torch.device("cpu"))
    stylizer.trunk(settings)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gen = torch.Generator().manual_seed(0)
    sizes = scale_sizes(min_size, long_side)
    last_pixels = 3 * long_side * (long_side * 3 // 4)
    plan = [(size, iterations) for size in sizes[:-1]] + [(long_side, lbfgs_history(last_pixels) + 2)]
    stamps: list[tuple[int, float]] = []
    item = Inputs(random_image(long_side, long_side * 3 // 4, gen), [random_image(long_side, long_side, gen)])
    hooks = Hooks(
        on_scale=lambda k, size, n: stamps.clear(),
        on_iteration=lambda i, losses: stamps.append((i, time.perf_counter())),
    )
    stylizer.stylize([item], settings, hooks, plan=plan)
    per_iteration = statistics.median(b - a for (_, a), (_, b) in zip(stamps, stamps[1:])) if len(stamps) > 1 else 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(MemoryFigures(long_side, tuple(sizes), peak, baseline, per_iteration))


def memory_figures(model: str, cache_dir: Path, long_side: int, min_size: int, iterations: int = 3) -> MemoryFigures:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(queue, model, str(cache_dir), long_side, min_size, iterations))
    proc.start()
    try:
        return queue.get(timeout=3600)
    finally:
        proc.join()


@dataclass(frozen=True)
class ThroughputFigures:
    workers: int
    rows: int
    seconds: float  # wall time of the whole run, worker start-up included

    @property
    def images_per_hour(self) -> float:
        return self.rows * 3600 / self.seconds


def throughput_manifest(folder: Path, rows: int, long_side: int) -> Path:
    """`rows` generated photo-like contents (4:3) and two generated styles: a nightly batch in miniature."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    h = long_side * 3 // 4
    y, x = np.mgrid[0:h, 0:long_side].astype(np.float32)
    lines = ["content,style"]
    for i in range(rows):
        img = np.stack([x / long_side, y / h, np.full_like(x, rng.random())], axis=-1)
        img += 0.25 * np.sin((x * rng.random() + y * rng.random()) / 9.0)[..., None]
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"content{i}.png")
        lines.append(f"content{i}.png,style{i % 2}.png")
    for k in range(2):
        bands = np.sin((x + y * (k + 1)) * 0.3) * 0.5 + 0.5
        img = np.stack([bands, 1 - bands, np.cos(x * 0.2) * 0.5 + 0.5], axis=-1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"style{k}.png")
    path = folder / "bench.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def throughput_figures(
    model: str, cache_dir: Path, workers: int, rows: int, long_side: int, iterations: int, device: str = "cpu"
) -> ThroughputFigures:
    """Images per hour for a whole run of `rows` rows on `workers` worker slots of `device`, through the same
    engine `batchstyle run` uses. Each measurement gets a fresh target cache (weights and exported graphs are
    shared), so no run profits from another's targets."""
    import tempfile

    from batchstyle.manifest import read_manifest
    from batchstyle.model.export import export_graph, graph_matches
    from batchstyle.model.weights import resolve
    from batchstyle.run.engine import RunConfig, run

    source, _ = resolve(model, cache_dir)
    spec = graph_spec(source, make_settings(default_values()))
    if not graph_matches(cache_dir / "onnx" / spec.filename(), spec):  # exported here, outside the timed run
        export_graph(source.load(cache_dir), spec, cache_dir / "onnx")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        cache.mkdir()
        for shared in ("weights", "onnx", "downloads"):
            if (cache_dir / shared).exists():
                (cache / shared).symlink_to((cache_dir / shared).resolve())
        manifest = read_manifest(
            throughput_manifest(root / "in", rows, long_side),
            {**default_values(), "size": long_side, "iterations": iterations},
            root / "out",
        )
        devices = ",".join([device] * workers)
        start = time.perf_counter()
        summary = run(manifest, RunConfig(model=model, devices=devices, cache_dir=cache))
        seconds = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"benchmark rows failed: {summary.failed}")
    return ThroughputFigures(workers, rows, seconds)
