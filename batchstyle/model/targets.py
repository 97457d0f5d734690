"""Content features and style Gram matrices: what the optimiser is pulled towards, and where they come from.

Targets are forward-only work on fixed images, so they can run in ONNX Runtime (TensorRT -> CUDA -> CPU) instead of
PyTorch, and they depend only on the image bytes, the resize and the network, so they are cached on disk by content
address: rows sharing a style compute it once, and a nightly rerun computes nothing it computed before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from batchstyle.model.cache import TargetCache
from batchstyle.model.export import target_graph
from batchstyle.model.graph import GRAM_NORMALISATION, INPUT_NAME, GraphSpec, shared_graph
from batchstyle.model.layout import layer_shape
from batchstyle.model.weights import Weights
from batchstyle.store import StoreError, fetch
from batchstyle.version import ALGORITHM_VERSION


@dataclass(frozen=True)
class Targets:
    """What one scale's objective pulls towards; image b's at index b of a batch of B.

    Style targets come per style image k of K: with masks (spatial control) each style keeps its own Gram and mean
    and its region of the output; without, a row's styles are blended into one (K = 1) by its blend weights.
    """

    content: dict[str, torch.Tensor]  # layer -> (B, C, H, W) feature maps of the content images
    grams: dict[str, torch.Tensor]  # layer -> (B, K, C, C) Gram matrices F F^T / HW of the style images
    means: dict[str, torch.Tensor]  # layer -> (B, K, C) mean features of the style images
    style_weights: torch.Tensor  # (B, K) each style's share of the style loss, summing to 1
    style_masks: torch.Tensor | None = None  # (B, K, H, W) at the output's size: where each style goes
    content_weights: torch.Tensor | None = None  # (B, 1, H, W) at the output's size: the content loss per position


def style_targets(
    found: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    style_layers: Sequence[str],
    masks: torch.Tensor | None = None,
    content_weights: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """One image's style targets from each style's graph outputs (`gram_<layer>`, `mean_<layer>`, batch 1): kept
    apart under masks, else mixed by the blend weights (normalised to sum to 1) into one style. A mixture's Gram and
    mean are the blends of its parts', so its covariance is the mixture's too."""
    if len(found) != len(weights):
        raise ValueError(f"{len(found)} styles but {len(weights)} blend weights")
    share = torch.tensor([float(w) / float(sum(weights)) for w in weights])
    if masks is not None:
        grams = {name: torch.stack([f[f"gram_{name}"][0] for f in found])[None] for name in style_layers}
        means = {name: torch.stack([f[f"mean_{name}"][0] for f in found])[None] for name in style_layers}
        return grams, means, share[None].to(masks.device), masks
    grams = {name: sum(f[f"gram_{name}"] * w for f, w in zip(found, share.tolist()))[:, None] for name in style_layers}
    means = {name: sum(f[f"mean_{name}"] * w for f, w in zip(found, share.tolist()))[:, None] for name in style_layers}
    return grams, means, torch.ones(1, 1), None


def stack_targets(targets: Sequence[Targets]) -> Targets:
    """One row's targets each (batch 1) -> the targets of a batch, image b's along dim 0 at index b.

    Rows are optimised together only when their outputs share a size and their settings (masks included), so
    every field stacks.
    """
    if not targets:
        raise ValueError("no targets to stack")
    first = targets[0]
    if any(set(t.content) != set(first.content) or set(t.grams) != set(first.grams) for t in targets):
        raise ValueError("targets of a batch must tap the same layers")

    def cat(field: str) -> torch.Tensor | None:
        values = [getattr(t, field) for t in targets]
        return None if values[0] is None else torch.cat([v.to(values[0].device) for v in values])

    return Targets(
        content={name: torch.cat([t.content[name] for t in targets]) for name in first.content},
        grams={name: torch.cat([t.grams[name] for t in targets]) for name in first.grams},
        means={name: torch.cat([t.means[name] for t in targets]) for name in first.means},
        style_weights=torch.cat([t.style_weights for t in targets]),
        style_masks=cat("style_masks"),
        content_weights=cat("content_weights"),
    )


# --- backends: pixels -> named graph outputs (content_<layer>, gram_<layer>, mean_<layer>) ------------------


class Backend(Protocol):
    name: str
    provider: str

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TorchBackend:
    def __init__(self, weights: Weights, spec: GraphSpec, device: torch.device) -> None:
        self.graph = target_graph(weights, spec).to(device)
        self.names = spec.output_names
        self.name = "torch"
        self.provider = f"torch:{device}"

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.graph(pixels)))


def ort_providers(
    available: Sequence[str],
    device: torch.device,
    cache_dir: Path,
    trt_fp16: bool = False,
    profile: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The provider chain for a device from what this onnxruntime build offers: TensorRT -> CUDA -> CPU on CUDA,
    CoreML -> CPU on an Apple GPU (mps), CPU elsewhere.

    TensorRT keeps its engines and timing cache under the batchstyle cache, and gets one shape profile spanning the
    image sizes of the run (min, opt, max as (height, width)), so engines are built once, not per image size.
    CoreML is asked for an ML Program on CPU and GPU: its default NeuralNetwork format and the Neural Engine compute
    in fp16, and targets stay fp32.
    """
    chain: list[tuple[str, dict[str, Any]]] = []
    if device.type == "cuda":
        device_id = device.index or 0
        if "TensorrtExecutionProvider" in available:
            trt_dir = cache_dir / "tensorrt"
            options: dict[str, Any] = {
                "device_id": device_id,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(trt_dir / "engines"),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(trt_dir / "timing"),
                "trt_fp16_enable": trt_fp16,
            }
            if profile is not None:
                (h0, w0), (h1, w1), (h2, w2) = profile
                options["trt_profile_min_shapes"] = f"{INPUT_NAME}:1x3x{h0}x{w0}"
                options["trt_profile_opt_shapes"] = f"{INPUT_NAME}:1x3x{h1}x{w1}"
                options["trt_profile_max_shapes"] = f"{INPUT_NAME}:1x3x{h2}x{w2}"
            chain.append(("TensorrtExecutionProvider", options))
        if "CUDAExecutionProvider" in available:
            # Each target is computed once at its shape, and a run meets many shapes: the exhaustive cuDNN search
            # ORT does by default for every new one would cost more than the convolutions it tunes (see
            # numerics.CUDNN_BENCHMARK). The arena grows by what is asked, not to the next power of two, so the
            # memory `--batch-size auto` counted on is not taken by targets.
            cuda_options = {
                "device_id": device_id,
                "cudnn_conv_algo_search": "HEURISTIC",
                "arena_extend_strategy": "kSameAsRequested",
            }
            chain.append(("CUDAExecutionProvider", cuda_options))
    elif device.type == "mps" and "CoreMLExecutionProvider" in available:
        chain.append(("CoreMLExecutionProvider", {"ModelFormat": "MLProgram", "MLComputeUnits": "CPUAndGPU"}))
    chain.append(("CPUExecutionProvider", {}))
    return chain


CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # bind CUDA memory in place


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` across processes, held while TensorRT may build and write engines there.

    Every worker of a run shares one engine cache: without the lock, workers starting together each build the same
    engine (minutes each) and write the same files at once, and one can read another's half-written engine. With it,
    the first builds and writes, and the others wait and then load its engine. The OS drops the lock when its holder
    dies, however it dies. Where there is no flock (Windows), nothing is locked.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform == "win32":  # pragma: no cover - no flock
        yield
        return
    import fcntl

    with open(folder / ".build.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class OrtBackend:
    """ONNX Runtime with IO binding: inputs and outputs are torch tensors on the worker's device, no host copies."""

    def __init__(
        self,
        graph_path: Path,
        spec: GraphSpec,
        arch: str,
        device: torch.device,
        cache_dir: Path,
        trt_fp16: bool = False,
        profile: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None,
        warn: Callable[[str], None] = lambda text: None,
        only: str | None = None,
    ) -> None:
        """`only` keeps that provider of the chain (and the CPU one it falls back to): what a benchmark of one
        provider against another asks for."""
        import onnxruntime as ort

        chain = ort_providers(ort.get_available_providers(), device, cache_dir, trt_fp16, profile)
        if only is not None:
            chain = [(name, options) for name, options in chain if name in (only, "CPUExecutionProvider")]
        for _, options in chain:
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                if key in options:
                    Path(options[key]).mkdir(parents=True, exist_ok=True)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # ORT's pool threads spin-wait after each run by default; between target computations that steals the
        # cores PyTorch's optimisation loop needs (measured: a 64 px run slowed from seconds to minutes).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.intra_op_num_threads = torch.get_num_threads()
        # The CPU arena would keep the largest run's buffers for the worker's life, beside the optimisation that
        # follows: 2 GiB at 2048 px (peak of a 2048 px run 10.6 GiB with it, 8.6 without, at no cost in time).
        opts.enable_cpu_mem_arena = False
        self.trt_dir = cache_dir / "tensorrt"
        trt = any(name == "TensorrtExecutionProvider" for name, _ in chain)
        # With a shape profile TensorRT builds its engine while the session is created; without one, at the first
        # run of each shape outside what it has built for.
        with build_lock(self.trt_dir) if trt else contextlib.nullcontext():
            self.session = ort.InferenceSession(
                str(graph_path), opts, providers=[name for name, _ in chain], provider_options=[o for _, o in chain]
            )
        self.provider = self.session.get_providers()[0]
        self.shapes_run: set[tuple[int, ...]] = set()
        self.name = "ort"
        self.spec = spec
        self.arch = arch
        self.device = device
        if device.type == "cuda" and self.provider == "CPUExecutionProvider":
            warn(
                f"ONNX Runtime runs targets on the CPU although the device is {device}: install onnxruntime-gpu "
                "(pip install 'batchstyle[gpu]') or use --targets torch"
            )

    @property
    def io_device(self) -> torch.device:
        """Where inputs and outputs are bound: the GPU when a CUDA provider (CUDA, TensorRT) runs, else host memory.
        A CPU session cannot read CUDA pointers (a CPU fallback on a GPU host copies through the host), and ONNX
        Runtime cannot bind MPS tensors at all: CoreML reads and writes host memory."""
        return self.device if self.device.type == "cuda" and self.provider in CUDA_PROVIDERS else torch.device("cpu")

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        import numpy as np

        io = self.io_device
        pixels = pixels.to(io, torch.float32).contiguous()
        b, _, h, w = pixels.shape
        kind, index = io.type, io.index or 0
        if io.type == "cuda":
            # ORT runs on its own stream: torch's pending writes to the input (and to the memory the outputs reuse)
            # must be finished first. ORT's Run synchronises its own stream before returning.
            torch.cuda.current_stream(io).synchronize()
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, kind, index, np.float32, tuple(pixels.shape), pixels.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name in self.spec.output_names:
            role, layer = name.split("_", 1)
            c, fh, fw = layer_shape(self.arch, layer, h, w)
            shape = {"content": (b, c, fh, fw), "gram": (b, c, c), "mean": (b, c)}[role]
            outputs[name] = torch.empty(shape, dtype=torch.float32, device=io)
            binding.bind_output(name, kind, index, np.float32, shape, outputs[name].data_ptr())
        first = self.provider == "TensorrtExecutionProvider" and tuple(pixels.shape) not in self.shapes_run
        with build_lock(self.trt_dir) if first else contextlib.nullcontext():
            self.session.run_with_iobinding(binding)
        self.shapes_run.add(tuple(pixels.shape))
        return {name: t.to(self.device) for name, t in outputs.items()}


def backend_factory(
    weights: Weights,
    device: torch.device,
    cache_dir: Path,
    targets: str,
    warn: Callable[[str], None],
    trt_fp16: bool = False,
    profile: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None,
    torch_graphs: frozenset[GraphSpec] = frozenset(),
    export: bool = False,
    shared: str | None = None,
) -> Callable[[GraphSpec], Backend]:
    """How each target graph is opened: ONNX Runtime on its exported graph when `targets` is "ort", torch otherwise.

    A run's workers get `export=False`: their parent exported every graph before they started, and a graph that is
    missing (a Ray node without the shared cache) or failed to export (`torch_graphs`) is computed with torch. The
    Python facade exports on first use instead, so its targets, and hence its pixels, are a run's. With a `shared`
    cache URL a graph missing here is fetched from it (the parent put it there after exporting it).
    """
    use_ort = targets == "ort"
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

    def make(graph: GraphSpec) -> Backend:
        from batchstyle.model.export import export_graph
        from batchstyle.model.graph import ExportError, graph_matches

        path = cache_dir / "onnx" / graph.filename()
        if graph in torch_graphs:
            return TorchBackend(weights, graph, device)
        if export and not graph_matches(path, graph):
            try:
                export_graph(weights, graph, path.parent)
            except (ExportError, OSError, ImportError) as exc:
                warn(f"ONNX export failed ({exc}); targets are computed with torch")
                return TorchBackend(weights, graph, device)
        if shared is not None and not graph_matches(path, graph):
            url = shared_graph(shared, graph)
            try:
                if fetch(url, path) and not graph_matches(path, graph):
                    path.unlink()  # not this spec's graph, whatever its name says: never opened
                    warn(f"{url} is not the graph its name says: targets are computed with torch")
                    return TorchBackend(weights, graph, device)
            except StoreError as exc:
                warn(f"cannot fetch the target graph from the shared cache ({exc})")
        if not path.is_file():
            # A node that does not share the parent's cache folder (Ray): targets are right either way.
            warn(f"{path} is not on this node: targets are computed with torch; share --cache-dir to use ONNX Runtime")
            return TorchBackend(weights, graph, device)
        backend = OrtBackend(path, graph, weights.arch, device, cache_dir, trt_fp16, profile, warn=warn)
        if backend.provider not in seen:
            seen.add(backend.provider)
            warn(f"targets: ONNX Runtime on {backend.provider}")
        return backend

    return make


# --- the content-addressed cache ------------------------------------------------------------------------------


def target_key(spec: GraphSpec, role: str, image_digest: str, size: tuple[int, int], variant: str) -> str:
    """Everything a target depends on: image bytes, the resize applied, the network (by its weights' hash, not its
    name or path), the preprocessing, the layers, the maths and batchstyle's algorithm version."""
    layers = spec.content_layers if role == "content" else spec.style_layers
    material = {
        "algorithm": ALGORITHM_VERSION,
        "role": role,
        "image": image_digest,
        "size": list(size),
        "variant": variant,
        "preprocess": spec.preprocess,
        "weights": spec.weights_sha256,
        "pooling": spec.pooling,
        "layers": list(layers),
        "normalisation": GRAM_NORMALISATION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class TargetStore:
    """Hands out targets for one worker: from the cache when it has them, else from its backend (then cached)."""

    def __init__(
        self,
        make_backend: Callable[[GraphSpec], Backend],
        cache: TargetCache | None,
        precision: str = "fp32",
        warn: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.make_backend = make_backend
        self.cache = cache
        self.precision = precision  # part of every key: fp16 TensorRT targets never stand in for fp32 ones
        self.warn = warn
        self.backends: dict[GraphSpec, Backend] = {}
        self.computed = 0

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def backend(self, spec: GraphSpec) -> Backend:
        if spec not in self.backends:
            self.backends[spec] = self.make_backend(spec)
        return self.backends[spec]

    def get(
        self,
        spec: GraphSpec,
        role: str,
        image_digest: str,
        variant: str,
        pixels: torch.Tensor,
        compute: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Targets of one image for one role ('content' or 'style'), and whether they came from the cache.
        `compute` computes them instead of the spec's backend on a miss (tile by tile, for large images)."""
        h, w = pixels.shape[-2:]
        key = target_key(spec, role, image_digest, (w, h), f"{variant}:{self.precision}")
        prefixes = ("content_",) if role == "content" else ("gram_", "mean_")
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return {name: t.to(pixels.device) for name, t in cached.items()}, True
        outputs = (compute or self.backend(spec))(pixels)
        self.computed += 1
        # Content targets by layer name; style targets keep their kind: gram_<layer> and mean_<layer>.
        found = {name.removeprefix("content_"): t for name, t in outputs.items() if name.startswith(prefixes)}
        if self.cache is not None:
            try:
                self.cache.put(key, role, found)
            except (OSError, sqlite3.Error) as exc:  # a full or read-only cache costs reuse, never the row
                self.warn(f"could not write the target cache ({exc}); targets are recomputed next time")
        return found, False

    def prefetch(self, spec: GraphSpec, role: str, items: Sequence[tuple[str, str, torch.Tensor]]) -> int:
        """Computes the targets of many images of one size in one backend call and caches them, so the `get`s that
        follow are hits: a clip's content frames go through ONNX Runtime in batches. Items are (digest, variant,
        (1, 3, H, W) pixels); returns how many were computed. Without a cache there is nowhere to keep them."""
        if self.cache is None or not items:
            return 0
        missing = []
        for digest, variant, pixels in items:
            h, w = pixels.shape[-2:]
            key = target_key(spec, role, digest, (w, h), f"{variant}:{self.precision}")
            if self.cache.get(key, share=False) is None:  # a clip's frames: nothing shares them (`TargetCache.put`)
                missing.append((key, pixels))
        if not missing:
            return 0
        outputs = self.backend(spec)(torch.cat([pixels for _, pixels in missing]))
        self.computed += 1
        prefixes = ("content_",) if role == "content" else ("gram_", "mean_")
        for b, (key, _) in enumerate(missing):
            found = {
                name.removeprefix("content_"): t[b : b + 1].clone()
                for name, t in outputs.items()
                if name.startswith(prefixes)
            }
            try:
                self.cache.put(key, role, found, share=False)
            except (OSError, sqlite3.Error) as exc:
                self.warn(f"could not write the target cache ({exc}); targets are recomputed next time")
                break
        return len(missing)

    def provider(self, spec: GraphSpec) -> str:
        """What computed this spec's targets in this worker; 'cache' when every one was a hit."""
        backend = self.backends.get(spec)
        return backend.provider if backend is not None else "cache"
