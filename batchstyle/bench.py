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

from batchstyle.model.graph import graph_spec
from batchstyle.model.numerics import PRECISIONS, configure_device
from batchstyle.model.precision import decide
from batchstyle.model.stylize import Hooks, Inputs, Stylizer
from batchstyle.model.tiles import MemoryPolicy
from batchstyle.model.weights import Weights, default_cache_dir
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
    `device` and without repeats; `auto` is every precision `--precision auto` chooses among there."""
    names = [name.strip().lower() for name in asked.split(",") if name.strip()]
    unknown = [name for name in names if name not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision {', '.join(unknown)}: use {', '.join(PRECISIONS)}")
    defaults = {"cuda": ["tf32", "bf16"], "cpu": ["bf16"]}.get(device.type, [])  # bf16 on CUDA: asked-for only
    found = ["fp32"]
    for name in names:
        for precision in defaults if name == "auto" else [name]:
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
    dev = torch.device(device)
    precision = decide(weights, dev, precision, default_cache_dir()).chosen
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
    ort_error: float | None = None  # worst relative error of any output against torch's
    ort_setup_seconds: float | None = None  # opening the session: TensorRT builds (or loads) its engine here


def target_figures(
    weights: Weights,
    long_side: int,
    cache_dir: Path,
    repeats: int = 5,
    device: str = "cpu",
    provider: str | None = None,
    trt_fp16: bool = False,
) -> TargetFigures:
    """Median seconds to compute one row's targets (content features of one image, Grams of one style), with torch
    and with ONNX Runtime: its first provider for the device, or `provider` alone (then `ort_provider` says what
    actually ran: the CPU provider when `provider` is not in this build)."""
    from batchstyle.model.export import export_graph
    from batchstyle.model.graph import graph_matches
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
    start = time.perf_counter()
    ort_backend = OrtBackend(
        export_dir / spec.filename(),
        spec,
        weights.arch,
        dev,
        cache_dir,
        trt_fp16=trt_fp16,
        profile=((h, w), (h, w), (w, w)),  # the content's and the style's shapes: one engine for both
        only=provider,
    )
    setup = time.perf_counter() - start
    ort_s = _median_seconds(lambda: (ort_backend(content), ort_backend(style)), repeats, dev)
    error = 0.0
    for pixels in (content, style):
        expected, got = torch_backend(pixels), ort_backend(pixels)
        for name, ref in expected.items():
            scale = ref.abs().max().clamp_min(1e-12)
            error = max(error, float((got[name].to(ref.device) - ref).abs().max() / scale))
    return TargetFigures((w, h), torch_s, ort_s, ort_backend.provider, error, setup)


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
    from batchstyle.model.graph import GraphSpec
    from batchstyle.model.targets import Backend, OrtBackend, TargetCache, TargetStore, TorchBackend

    dev = torch.device(device)
    spec = graph_spec(weights.source, make_settings(default_values()))
    h, w = long_side * 3 // 4, long_side
    gen = torch.Generator().manual_seed(1)
    contents = [torch.rand(1, 3, h, w, generator=gen).to(dev) for _ in range(rows)]
    style_images = [torch.rand(1, 3, w, w, generator=gen).to(dev) for _ in range(styles)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make: Callable[[GraphSpec], Backend]
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
    tiling: str = "untiled"  # at the final scale: "untiled", or the tile size and L-BFGS pairs
    predicted_mib: float = 0.0  # what `memory.scale_bytes` predicted for the final scale's optimisation

    @property
    def working_mib(self) -> float:
        return self.peak_mib - self.baseline_mib


def _memory_child(
    queue: Any,
    model: str,
    cache_dir: str,
    long_side: int,
    min_size: int,
    iterations: int,
    memory: MemoryPolicy | None = None,
    final_iterations: int = 0,
) -> None:
    """`iterations` at the coarser scales; the final scale runs `final_iterations`, by default until the L-BFGS
    history is full, as in a real run. Then the result is encoded and saved as a row's would be: every step a row
    takes, targets included, counts in the peak."""
    # A fresh process per configuration, so ru_maxrss is this configuration's peak alone.
    import resource
    import tempfile

    from batchstyle.images import save_image_atomic
    from batchstyle.model.pixels import tensor_to_image
    from batchstyle.model.scales import scale_sizes
    from batchstyle.model.weights import resolve

    source, _ = resolve(model, Path(cache_dir))
    weights = source.load(Path(cache_dir))
    settings = make_settings({**default_values(), "size": long_side, "min_size": min_size, "iterations": iterations})
    stylizer = Stylizer.local(weights, torch.device("cpu"), memory=memory)
    stylizer.trunk(settings)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gen = torch.Generator().manual_seed(0)
    sizes = scale_sizes(min_size, long_side)
    item = Inputs(random_image(long_side, long_side * 3 // 4, gen), [random_image(long_side, long_side, gen)])
    final = stylizer.tiling([item], settings, long_side)
    plan = [(size, iterations) for size in sizes[:-1]] + [(long_side, final_iterations or final.history + 2)]
    stamps: list[tuple[int, float]] = []
    hooks = Hooks(
        # on_scale comes once a scale's targets are ready: the first iteration is timed from there
        on_scale=lambda k, size, n: stamps.__setitem__(slice(None), [(0, time.perf_counter())]),
        on_iteration=lambda i, losses: stamps.append((i, time.perf_counter())),
    )
    (result,) = stylizer.stylize([item], settings, hooks, plan=plan)
    ends = [t for _, t in stamps]
    per_iteration = statistics.median(b - a for a, b in zip(ends, ends[1:])) if len(ends) > 1 else 0.0
    with tempfile.TemporaryDirectory() as folder:
        save_image_atomic(tensor_to_image(result.image), Path(folder) / "out.png", {})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    used = result.tilings[-1]
    pairs = f"{used.history} pairs" + ("" if used.store == "fp32" else f" {used.store}")
    tiling = f"tile {used.tile}, {pairs}" if used.tile else f"untiled, {pairs}"
    queue.put(MemoryFigures(long_side, tuple(sizes), peak, baseline, per_iteration, tiling, used.predicted / 2**20))


def untiled_bytes(model: str, cache_dir: Path, long_side: int) -> int:
    """What the memory model predicts a single-scale untiled 4:3 row of this long side needs, default options."""
    from batchstyle.model.memory import lbfgs_history, scale_bytes
    from batchstyle.model.weights import resolve

    source, _ = resolve(model, cache_dir)
    s = make_settings(default_values())
    w, h = long_side, long_side * 3 // 4
    return scale_bytes(source.arch, s.content_layers, s.style_layers, w, h, history=lbfgs_history(3 * w * h))


def memory_figures(
    model: str,
    cache_dir: Path,
    long_side: int,
    min_size: int,
    iterations: int = 3,
    memory: MemoryPolicy | None = None,
    final_iterations: int = 0,
) -> MemoryFigures:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    args = (queue, model, str(cache_dir), long_side, min_size, iterations, memory, final_iterations)
    proc = ctx.Process(target=_memory_child, args=args)
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
    seconds_per_iteration: float  # the rows' own optimisation seconds over their iterations, as the ledger has them
    precisions: tuple[str, ...] = ()  # what the rows ran in, as the ledger has it

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
    model: str,
    cache_dir: Path,
    workers: int,
    rows: int,
    long_side: int,
    iterations: int,
    device: str = "cpu",
    slots: str | None = None,
    precision: str = "auto",
) -> ThroughputFigures:
    """Images per hour for a whole run of `rows` rows on `workers` worker slots of `device` (or on the `--devices`
    list `slots`, e.g. every GPU), through the same engine `batchstyle run` uses. Each measurement gets a fresh
    target cache (weights, exported graphs and the precision decision are shared), so no run profits from another's
    targets; `precision` is the run's `--precision`."""
    import tempfile

    from batchstyle.manifest import read_manifest
    from batchstyle.model.export import export_graph
    from batchstyle.model.graph import graph_matches
    from batchstyle.model.weights import resolve
    from batchstyle.run.config import RunConfig
    from batchstyle.run.engine import run
    from batchstyle.run.ledger import read_records

    source, _ = resolve(model, cache_dir)
    spec = graph_spec(source, make_settings(default_values()))
    if not graph_matches(cache_dir / "onnx" / spec.filename(), spec):  # exported here, outside the timed run
        export_graph(source.load(cache_dir), spec, cache_dir / "onnx")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        cache.mkdir()
        for shared in ("weights", "onnx", "downloads", "precision"):
            if (cache_dir / shared).exists():
                (cache / shared).symlink_to((cache_dir / shared).resolve())
        manifest = read_manifest(
            throughput_manifest(root / "in", rows, long_side),
            {**default_values(), "size": long_side, "iterations": iterations},
            root / "out",
        )
        devices = slots or ",".join([device] * workers)
        start = time.perf_counter()
        summary = run(manifest, RunConfig(model=model, devices=devices, cache_dir=cache, precision=precision))
        seconds = time.perf_counter() - start
        records = read_records(root / "out")[0]
    if summary.failed:
        raise RuntimeError(f"benchmark rows failed: {summary.failed}")
    per_iteration = sum(r.seconds or 0.0 for r in records) / max(1, sum(r.iterations or 0 for r in records))
    ran = tuple(sorted({r.precision or "?" for r in records}))
    return ThroughputFigures(workers, rows, seconds, per_iteration, ran)


# --- bench device: every path of one device in one prepared run ------------------------------------------------------

# Peak dense TFLOP/s (no structured sparsity) by the name torch reports, from NVIDIA's data sheets: fp32 on the CUDA
# cores, tf32 and bf16 on the tensor cores. Longer names are tried first (H100 PCIe before H100).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},
    "V100": {"fp32": 15.7},
    "T4": {"fp32": 8.1},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for a device name (`NVIDIA H100 80GB HBM3`, `NVIDIA A100-SXM4-40GB`) and precision."""
    import re

    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", device_name):
            return PEAK_TFLOPS[key].get(precision)
    return None


def iteration_flops(arch: str, settings: Settings, width: int, height: int, batch: int = 1) -> int:
    """FLOPs of one optimisation iteration, from the layout: the convolutions' forward up to the deepest tapped layer
    and their backward to the pixels, which costs as much again (see `layout.conv_flops`)."""
    from batchstyle.model.layout import conv_flops, deepest

    last = deepest(arch, (*settings.content_layers, *settings.style_layers))
    return 2 * conv_flops(arch, last, height, width) * batch


@dataclass(frozen=True)
class ImageFigures:
    size: tuple[int, int]
    batch: int
    iterations: int
    precision: str
    seconds: float  # the whole stylization: targets, set-up, every iteration, the final evaluation
    seconds_per_iteration: float

    @property
    def images_per_hour(self) -> float:
        return self.batch * 3600 / self.seconds


def image_figures(
    weights: Weights, long_side: int, iterations: int, device: str = "cpu", batch: int = 1, precision: str = "auto"
) -> ImageFigures:
    """One stylization of `batch` 4:3 images at one scale, `iterations` L-BFGS iterations, timed whole, through the
    `Stylizer` a worker uses (targets with torch, uncached)."""
    dev = torch.device(device)
    precision = decide(weights, dev, precision, default_cache_dir()).chosen
    configure_device(dev, precision)
    settings = make_settings({**default_values(), "size": long_side, "min_size": 0, "iterations": iterations})
    stylizer = Stylizer.local(weights, dev, precision)
    stylizer.trunk(settings)
    h, w = long_side * 3 // 4, long_side
    gen = torch.Generator().manual_seed(2)
    items = [Inputs(random_image(w, h, gen), [random_image(w, h, gen)]) for _ in range(batch)]
    stamps: dict[int, float] = {}

    def stamp(iteration: int, _: object) -> None:
        stamps[iteration] = time.perf_counter()  # a burst's reports come after its host copy: in step with the GPU

    _sync(dev)
    start = time.perf_counter()
    stylizer.stylize(items, settings, Hooks(on_iteration=stamp))
    _sync(dev)
    seconds = time.perf_counter() - start
    per_iteration = _per_iteration(stamps, dev) or seconds / iterations
    return ImageFigures((w, h), batch, iterations, precision, seconds, per_iteration)


@dataclass(frozen=True)
class CudnnFigures:
    benchmark: bool
    first_seconds: float  # the first forward+backward at a shape never seen: the algorithm search included
    seconds: float  # median of the ones after


def cudnn_figures(
    weights: Weights, long_side: int, device: str, precision: str, repeats: int = 10
) -> list[CudnnFigures]:
    """What cudnn.benchmark costs and gains: the first forward+backward at a new shape and the median after it, with
    the search off and on, each at a shape of its own (so neither finds the other's tuning)."""
    dev = torch.device(device)
    settings = make_settings({**default_values(), "size": long_side, "min_size": 0})
    model = Stylizer.local(weights, dev, precision).trunk(settings)
    net = model.lowered(torch.bfloat16) if precision == "bf16" else model
    found = []
    for k, benchmark in enumerate((False, True)):
        configure_device(dev, precision, cudnn_benchmark=benchmark)
        h = long_side * 3 // 4 - 8 * (k + 1)  # a height no other measurement used
        pixels = torch.rand(1, 3, h, long_side, device=dev, requires_grad=True)

        def bare(pixels: torch.Tensor = pixels) -> None:
            feats = net(pixels)
            sum(f.float().square().mean() for f in feats.values()).backward()
            pixels.grad = None

        _sync(dev)
        start = time.perf_counter()
        bare()
        _sync(dev)
        first = time.perf_counter() - start
        found.append(CudnnFigures(benchmark, first, _median_seconds(bare, repeats, dev)))
    configure_device(dev, precision)
    return found


def bench_weights(model: str, cache_dir: Path, say: Callable[[str], None]) -> Weights:
    """The weights to measure with: `model`, or seeded random weights of its architecture where its weights are
    neither cached nor downloadable (a GPU machine without network): what is timed is the architecture's cost."""
    from batchstyle.model.weights import SOURCES, WeightsError, _reachable, resolve

    source, _ = resolve(model, cache_dir)
    if source.arch == "vgg19" and not source.is_cached(cache_dir) and not _reachable("download.pytorch.org"):
        say(f"{source.name} weights are neither cached nor downloadable: random-vgg19 (same architecture and cost)")
        return SOURCES["random-vgg19"].load(cache_dir)
    try:
        return source.load(cache_dir)
    except WeightsError as exc:
        fallback = "random-vgg19" if source.arch == "vgg19" else "random"
        say(f"{source.name} weights cannot be had ({exc}): {fallback} (same architecture and cost)")
        return SOURCES[fallback].load(cache_dir)


@dataclass
class DeviceBenchOptions:
    slots: list[str]  # from --devices: the first is measured alone, all of them together for throughput
    model: str = "vgg19"
    cache_dir: Path = Path(".")
    size: int | None = None  # default: 512 on a GPU, 128 on a CPU
    iterations: int | None = None  # default: 500 on a GPU, 20 on a CPU
    batches: tuple[int, ...] | None = None  # default: (1, 4) on a GPU, (1,) on a CPU
    timed: int | None = None  # iterations timed per line of the iteration table: 10 on a GPU, 3 on a CPU
    rows: int | None = None  # of the throughput manifest: 4 per GPU; 1 on a CPU
    peak_tflops: float | None = None  # overrides the table, for the precision `auto` runs
    budget: float = 450.0  # seconds; once spent, the sections left are skipped, saying so


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (mps)"
    import platform

    caps: dict[str, Any] = getattr(torch.cpu, "get_capabilities", dict)()
    return f"{caps.get('cpu_name') or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def device_report(options: DeviceBenchOptions, echo: Callable[[str], None]) -> list[str]:
    """`batchstyle bench device`: every figure one device's day needs, printed as measured; returns what was skipped
    and why (also printed). Built from the other benchmarks' functions: iteration_figures, image_figures,
    target_figures, throughput_figures."""
    from batchstyle.model.memory import batch_that_fits, lbfgs_history
    from batchstyle.model.tiles import default_budget

    start = time.perf_counter()
    skipped: list[str] = []

    def skip(what: str, why: str) -> None:
        skipped.append(f"{what}: {why}")
        echo(f"  skipped {what}: {why}")

    def spent(what: str, needs: float = 0.0) -> bool:
        left = options.budget - (time.perf_counter() - start)
        if left > needs:
            return False
        skip(
            what,
            f"the time budget is spent ({options.budget:.0f} s, --budget)"
            if left <= 0
            else f"{left:.0f} s of the budget left, it needs about {needs:.0f}",
        )
        return True

    dev = torch.device(options.slots[0])
    accelerated = dev.type != "cpu"
    size = options.size or (512 if accelerated else 128)
    iterations = options.iterations or (500 if accelerated else 20)
    batches = options.batches or ((1, 4) if accelerated else (1,))
    timed = options.timed or (10 if accelerated else 3)
    name = device_name(dev)
    available: list[str] | None = None  # ONNX Runtime's providers; None: it is not installed
    try:
        import onnxruntime as ort

        available = ort.get_available_providers()
        ort_line = f"onnxruntime {ort.__version__} ({', '.join(available)})"
    except ImportError:
        ort_line = "no onnxruntime"
    cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if dev.type == "cuda" else ""
    echo(f"device {dev}: {name}; torch {torch.__version__}{cuda}; {ort_line}")
    weights = bench_weights(options.model, options.cache_dir, lambda text: echo(f"  {text}"))
    settings = make_settings({**default_values(), "size": size, "min_size": 0})
    h, w = size * 3 // 4, size
    flops = iteration_flops(weights.arch, settings, w, h)
    echo(f"model {weights.source.name} ({weights.arch}); one iteration at {w}x{h} is {flops / 1e9:.1f} GFLOP")
    decision = decide(weights, dev, "auto", options.cache_dir)
    auto = decision.chosen
    echo(f"--precision auto: {decision.describe()}")

    def peak(precision: str) -> float | None:
        if options.peak_tflops is not None and precision == auto:
            return options.peak_tflops
        return peak_tflops(name, precision)

    def of_peak(flop: float, seconds: float, precision: str) -> str:
        achieved = flop / seconds / 1e12
        top = peak(precision)
        return f"{achieved:10.3g}" + (f" {100 * achieved / top:6.1f}%" if top else "       -")

    # 1. Seconds per iteration, beside the same-precision floor and the fp32 floor.
    echo(f"\n1. seconds per L-BFGS iteration, batch {','.join(map(str, batches))}, floor = bare forward+backward")
    precisions = ["fp32"]
    if dev.type == "cuda":
        precisions += ["tf32", "bf16"]
    else:
        skip("tf32", f"TF32 exists on NVIDIA GPUs only, not on {dev.type}")
        if dev.type == "cpu":
            precisions.append("bf16")  # measured whatever the CPU's flags say: they say little about its speed
        else:
            skip("bf16", f"--precision auto is fp32 on {dev.type}")
    echo(f"{iteration_header()} {'floor TF/s':>10} {'of peak':>7}")
    for batch in batches:
        fp32_floor = None
        for precision in precisions:
            if spent(f"iteration {precision} batch {batch}"):
                continue
            step = iteration_figures(weights, size, "lbfgs", timed, str(dev), batch, precision)
            fp32_floor = fp32_floor or step.floor_seconds
            echo(f"{format_iteration(step, fp32_floor)} {of_peak(flops * batch, step.floor_seconds, precision)}")

    # 2. One whole image, and 3. images per hour at batch 1 and at the automatic batch.
    echo(f"\n2. one {w}x{h} image, {iterations} iterations, {auto}, batch 1 (targets, set-up and all)")
    one = None
    if not spent("one image"):
        one = image_figures(weights, size, iterations, str(dev), 1, auto)
        echo(
            f"  {one.seconds:.1f} s, {one.seconds_per_iteration:.4f} s/iteration; achieved TFLOP/s and share of the "
            f"{auto} peak{' (' + name + ')' if peak(auto) else ''}: "
            f"{of_peak(flops, one.seconds_per_iteration, auto).strip()}"
        )
        if peak(auto) is None:
            skip("share of peak", f"no peak known for {name!r} at {auto}: give --peak-tflops")
    echo("\n3. images per hour")
    if one is not None:
        echo(f"  batch 1: {one.images_per_hour:.0f}")
    if dev.type == "cuda":
        s, pairs = settings, lbfgs_history(3 * w * h)
        budget = default_budget(dev)  # what a run's only worker on this GPU is given
        batch = batch_that_fits(budget, weights.arch, s.content_layers, s.style_layers, w, h, pairs)
        if not spent(f"auto batch ({batch})"):
            batched = image_figures(weights, size, iterations, str(dev), batch, auto)
            echo(f"  auto batch {batch}: {batched.images_per_hour:.0f} ({batched.seconds:.1f} s for the batch)")
    else:
        skip("auto batch", f"--batch-size auto is 1 on {dev.type}: the figure is batch 1's")

    # 4. cudnn.benchmark: what the algorithm search costs at a new shape and gains after it.
    echo("\n4. cudnn.benchmark (off in runs: see model/numerics.py CUDNN_BENCHMARK)")
    if dev.type != "cuda":
        skip("cudnn.benchmark", f"cuDNN runs on NVIDIA GPUs only, not on {dev.type}")
    elif not spent("cudnn.benchmark"):
        for search in cudnn_figures(weights, size, str(dev), auto, timed):
            state = "on " if search.benchmark else "off"
            echo(
                f"  {state}: first forward+backward at a new shape {search.first_seconds:.3f} s, "
                f"then {search.seconds:.4f} s"
            )

    # 5. Images per hour of whole runs: one device, then every device of --devices.
    rows = options.rows or (4 * len(options.slots) if accelerated else 1)
    run_iterations = max(2, iterations // 5)
    echo(
        f"\n5. whole runs: {rows} generated row(s) at {size} px, {run_iterations} iterations a scale, start-up included"
    )
    if not spent("throughput, one device"):
        tp = throughput_figures(
            weights.source.name, options.cache_dir, 1, rows, size, run_iterations, str(dev), slots=options.slots[0]
        )
        echo(f"  1 device ({options.slots[0]}): {tp.images_per_hour:.0f} images/hour ({tp.seconds:.1f} s)")
    if len(options.slots) < 2:
        skip("throughput, every device", f"--devices names one device ({options.slots[0]})")
    elif not spent("throughput, every device"):
        slots = ",".join(options.slots)
        tp = throughput_figures(
            weights.source.name, options.cache_dir, len(options.slots), rows, size, run_iterations, slots=slots
        )
        echo(f"  {len(options.slots)} devices ({slots}): {tp.images_per_hour:.0f} images/hour ({tp.seconds:.1f} s)")

    # 6. Targets: torch against each ONNX Runtime provider there is for the device; TensorRT last (its engines
    # take minutes to build the first time, and are cached after).
    echo(f"\n6. one row's targets at {w}x{h} (content + one style): torch against ONNX Runtime")
    echo(f"  {'provider':<34} {'seconds':>9} {'/torch':>7} {'session s':>9} {'max rel err':>11}")
    if available is None:
        skip("ONNX Runtime targets", "onnxruntime is not installed")
        return skipped
    wanted: list[tuple[str, bool]] = {
        "cuda": [
            ("CUDAExecutionProvider", False),
            ("TensorrtExecutionProvider", False),
            ("TensorrtExecutionProvider", True),
        ],
        "mps": [("CoreMLExecutionProvider", False), ("CPUExecutionProvider", False)],
    }.get(dev.type, [("CPUExecutionProvider", False)])
    torch_line = False
    for provider, fp16 in wanted:
        label = provider.removesuffix("ExecutionProvider") + (" fp16" if fp16 else " fp32")
        if provider not in available:
            skip(f"targets on {label}", f"not in this onnxruntime build ({', '.join(available)})")
            continue
        if spent(f"targets on {label}", 150.0 if provider.startswith("Tensorrt") else 0.0):
            continue
        target = target_figures(weights, size, options.cache_dir, timed, str(dev), provider, fp16)
        if not torch_line:
            echo(f"  {'torch ' + str(dev):<34} {target.torch_seconds:>9.4f} {1:>7.3f}")
            torch_line = True
        if target.ort_provider != provider:
            skip(f"targets on {label}", f"ONNX Runtime fell back to {target.ort_provider}")
            continue
        assert target.ort_seconds is not None and target.ort_setup_seconds is not None and target.ort_error is not None
        echo(
            f"  {label:<34} {target.ort_seconds:>9.4f} {target.ort_seconds / target.torch_seconds:>7.3f} "
            f"{target.ort_setup_seconds:>9.1f} {target.ort_error:>11.1e}"
        )
    if dev.type != "cuda":
        skip("targets on CUDA and TensorRT", f"no CUDA device ({dev})")
    return skipped
