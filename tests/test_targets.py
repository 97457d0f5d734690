"""Targets: ONNX Runtime against torch, provider selection, the content-addressed cache, and what runs record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, write_manifest
from PIL import Image

from batchstyle.model.export import export_graph
from batchstyle.model.graph import graph_spec
from batchstyle.model.targets import OrtBackend, TargetCache, TargetStore, TorchBackend, ort_providers
from batchstyle.model.weights import SOURCES
from batchstyle.options import default_values, make_settings
from batchstyle.run.ledger import read_records

FAST = ("--model", "random", "--device", "cpu", "--size", "32", "--iterations", "4", "-q")
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def random_weights():
    return SOURCES["random"].load()


@pytest.fixture(scope="module")
def spec(random_weights):
    return graph_spec(random_weights.source, make_settings(default_values()))


@pytest.fixture(scope="module")
def graph(random_weights, spec, tmp_path_factory) -> Path:
    return export_graph(random_weights, spec, tmp_path_factory.mktemp("onnx")).path


# --- ONNX Runtime against torch -------------------------------------------------------------------------------


def test_ort_targets_match_torch_through_io_binding(random_weights, spec, graph: Path, tmp_path: Path) -> None:
    pixels = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    ort_out = OrtBackend(graph, spec, random_weights.arch, torch.device("cpu"), tmp_path)(pixels)
    torch_out = TorchBackend(random_weights, spec, torch.device("cpu"))(pixels)
    assert set(ort_out) == set(torch_out) == set(spec.output_names)
    for name, ref in torch_out.items():
        assert ort_out[name].shape == ref.shape, name
        assert ort_out[name].dtype == torch.float32
        rel = float((ort_out[name] - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-4, (name, rel)


def test_ort_session_returns_its_memory_after_each_run(random_weights, spec, graph: Path, tmp_path: Path) -> None:
    """ORT's CPU arena keeps the largest run's buffers for the session's life: at 2048 px that held 2 GiB beside
    the optimisation (measured peak of a one-iteration 2048 px run: 10.6 GiB with the arena, 8.6 without)."""
    backend = OrtBackend(graph, spec, random_weights.arch, torch.device("cpu"), tmp_path)
    assert backend.session.get_session_options().enable_cpu_mem_arena is False


def test_ort_and_torch_runs_give_the_same_output(tmp_path: Path, images: dict[str, Path]) -> None:
    """Separate caches, so each run really computes its targets with its own backend. fp32 for both: `auto` is
    decided by timing, once per cache, and under CPU load one run measured bf16 faster and the other fp32 (a
    difference of 36 levels, failed once beside the loaded suite)."""
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "in/photo.png,in/painting.png,out.png")
    outputs = {}
    for backend in ("ort", "torch"):
        result = cli(
            "run",
            manifest,
            *FAST,
            "--precision",
            "fp32",
            "--targets",
            backend,
            "--out",
            tmp_path / backend,
            "--cache-dir",
            tmp_path / f"cache-{backend}",
        )
        assert result.exit_code == 0, result.output
        record = read_records(tmp_path / backend)[0][0]
        assert record.provider == ("CPUExecutionProvider" if backend == "ort" else "torch:cpu")
        assert record.targets == "content=miss style=miss"
        outputs[backend] = np.asarray(Image.open(tmp_path / backend / "out.png"), np.int16)
    # The targets agree to float rounding; L-BFGS amplifies that, most where its projected steps put pixels on 0
    # or 1, which random weights' large first steps do to many (measured: 10 levels at most, 1.0 on average; 3 and
    # under 0.5 when the steps were clamped afterwards instead).
    diff = np.abs(outputs["ort"] - outputs["torch"])
    assert diff.max() <= 24 and diff.mean() < 2, (diff.max(), diff.mean())


# --- provider selection ---------------------------------------------------------------------------------------


def test_providers_on_a_gpu_host_go_tensorrt_cuda_cpu(tmp_path: Path) -> None:
    chain = ort_providers(
        ALL, torch.device("cuda:1"), tmp_path, trt_fp16=True, profile=((192, 256), (384, 512), (768, 1024))
    )
    assert [name for name, _ in chain] == ALL
    trt, cuda, cpu = (options for _, options in chain)
    assert trt["device_id"] == 1 and cuda["device_id"] == 1 and cpu == {}
    # Targets are computed once per shape: no exhaustive cuDNN search per shape, no power-of-two arena growth.
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC" and cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert trt["trt_fp16_enable"] is True
    assert Path(trt["trt_engine_cache_path"]).is_relative_to(tmp_path)
    assert Path(trt["trt_timing_cache_path"]).is_relative_to(tmp_path)
    assert trt["trt_profile_min_shapes"] == "pixels:1x3x192x256"
    assert trt["trt_profile_opt_shapes"] == "pixels:1x3x384x512"
    assert trt["trt_profile_max_shapes"] == "pixels:1x3x768x1024"


@pytest.mark.parametrize(
    ("available", "device", "expected"),
    [
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (
            ["TensorrtExecutionProvider", "CPUExecutionProvider"],
            "cuda:0",
            ["TensorrtExecutionProvider", "CPUExecutionProvider"],
        ),
        (["CPUExecutionProvider"], "cuda:0", ["CPUExecutionProvider"]),
        (ALL, "cpu", ["CPUExecutionProvider"]),
        (["AzureExecutionProvider", "CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"]),
        (
            ["CoreMLExecutionProvider", "CPUExecutionProvider"],
            "mps",
            ["CoreMLExecutionProvider", "CPUExecutionProvider"],
        ),
        (["CPUExecutionProvider"], "mps", ["CPUExecutionProvider"]),
        (["CoreMLExecutionProvider", *ALL], "cuda:0", ALL),
        (["CoreMLExecutionProvider", "CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"]),
    ],
)
def test_providers_fall_back_to_what_is_installed(available, device, expected, tmp_path: Path) -> None:
    assert [name for name, _ in ort_providers(available, torch.device(device), tmp_path)] == expected


def test_coreml_on_an_apple_gpu_keeps_targets_fp32(tmp_path: Path) -> None:
    """CoreML's default NeuralNetwork format and the Neural Engine compute in fp16: targets ask for neither."""
    chain = dict(ort_providers(["CoreMLExecutionProvider", "CPUExecutionProvider"], torch.device("mps"), tmp_path))
    assert chain["CoreMLExecutionProvider"] == {"ModelFormat": "MLProgram", "MLComputeUnits": "CPUAndGPU"}


def test_only_cuda_providers_bind_device_memory(random_weights, spec, graph: Path, tmp_path: Path) -> None:
    """ONNX Runtime reads CUDA pointers through CUDA and TensorRT only; MPS tensors it cannot bind at all, so a
    CoreML (or CPU) session on an Apple GPU goes through host memory. Decided by device and provider alone, so it is
    checked here on a CPU session standing in for the others."""
    backend = OrtBackend(graph, spec, random_weights.arch, torch.device("cpu"), tmp_path)
    for device, provider, io in [
        ("mps", "CoreMLExecutionProvider", "cpu"),
        ("mps", "CPUExecutionProvider", "cpu"),
        ("cuda:1", "CUDAExecutionProvider", "cuda:1"),
        ("cuda:0", "TensorrtExecutionProvider", "cuda:0"),
        ("cuda:0", "CPUExecutionProvider", "cpu"),
    ]:
        backend.device, backend.provider = torch.device(device), provider
        assert backend.io_device == torch.device(io), (device, provider)


def test_tensorrt_engine_builds_are_serialised_across_processes(tmp_path: Path) -> None:
    """Workers share one engine cache: while one holds the build lock (building and writing an engine), another
    process waits for it rather than building the same engine or reading a half-written one."""
    import subprocess
    import sys
    import textwrap

    from batchstyle.model.targets import build_lock

    pytest.importorskip("fcntl")
    folder = tmp_path / "tensorrt"
    probe = textwrap.dedent(
        f"""
        import fcntl, sys
        handle = open({str(folder / ".build.lock")!r}, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.exit(1)
        """
    )
    with build_lock(folder):
        held = subprocess.run([sys.executable, "-c", probe], timeout=60)
    free = subprocess.run([sys.executable, "-c", probe], timeout=60)
    assert (held.returncode, free.returncode) == (1, 0)


def test_cpu_fallback_on_a_gpu_device_is_a_visible_warning(random_weights, spec, graph: Path, tmp_path: Path) -> None:
    """This onnxruntime build has no CUDA provider: asking for cuda:0 must say so, not fall back silently."""
    said: list[str] = []
    backend = OrtBackend(graph, spec, random_weights.arch, torch.device("cuda:0"), tmp_path, warn=said.append)
    assert backend.provider == "CPUExecutionProvider"
    assert said and "onnxruntime-gpu" in said[0] and "cuda:0" in said[0]


# --- the cache ------------------------------------------------------------------------------------------------


def test_cache_returns_what_was_computed_and_counts_hits(random_weights, spec, tmp_path: Path) -> None:
    cache = TargetCache(tmp_path)
    store = TargetStore(lambda s: TorchBackend(random_weights, s, torch.device("cpu")), cache)
    pixels = torch.rand(1, 3, 40, 32, generator=torch.Generator().manual_seed(1))
    first, hit1 = store.get(spec, "style", "digest-a", "rgb", pixels)
    again, hit2 = store.get(spec, "style", "digest-a", "rgb", pixels)
    other_size, hit3 = store.get(spec, "style", "digest-a", "rgb", pixels[..., :36, :28])
    assert (hit1, hit2, hit3) == (False, True, False)
    assert store.computed == 2
    # A style's targets: its Gram and its mean features at every style layer.
    assert set(first) == {f"{kind}_{layer}" for layer in spec.style_layers for kind in ("gram", "mean")}
    for layer in first:
        assert torch.equal(first[layer], again[layer])
    info = cache.info()
    assert info["entries"] == 2 and info["hits"] == 1 and info["by_role"]["style"]["entries"] == 2
    cache.close()


def test_prefetch_computes_many_frames_in_one_call_and_get_then_hits(random_weights, spec, tmp_path: Path) -> None:
    cache = TargetCache(tmp_path)
    store = TargetStore(lambda s: TorchBackend(random_weights, s, torch.device("cpu")), cache)
    frames = torch.rand(5, 3, 24, 32, generator=torch.Generator().manual_seed(3)).split(1)
    items = [(f"clip:frame{i}", "rgb", frame) for i, frame in enumerate(frames)]
    assert store.prefetch(spec, "content", items) == 5
    assert store.computed == 1  # one batched backend call for the five frames
    alone = TargetStore(lambda s: TorchBackend(random_weights, s, torch.device("cpu")), None)
    for digest, _, frame in items:
        found, hit = store.get(spec, "content", digest, "rgb", frame)
        expected, _ = alone.get(spec, "content", digest, "rgb", frame)
        assert hit
        for layer in expected:
            torch.testing.assert_close(found[layer], expected[layer], rtol=1e-4, atol=1e-5)
    assert store.prefetch(spec, "content", items) == 0 and store.computed == 1
    cache.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_cache_file_is_recomputed_not_trusted(random_weights, spec, tmp_path: Path, damage: str) -> None:
    cache = TargetCache(tmp_path)
    store = TargetStore(lambda s: TorchBackend(random_weights, s, torch.device("cpu")), cache)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    good, _ = store.get(spec, "content", "digest-b", "rgb", pixels)
    [path] = list(cache.root.glob("*/*.safetensors"))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-5] ^= 0xFF  # inside the tensor bytes: only the checksum can tell
    else:
        data = bytearray(b"\x00" * 64)
    path.write_bytes(bytes(data))
    again, hit = store.get(spec, "content", "digest-b", "rgb", pixels)
    assert hit is False and store.computed == 2
    for layer in good:
        assert torch.equal(good[layer], again[layer])
    assert cache.get(path.stem) is not None, "the recomputed entry is written back whole"
    cache.close()


def test_four_rows_sharing_a_style_compute_it_once_and_a_rerun_computes_nothing(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,output",
        "in/photo.png,in/painting.png,a.png",
        "in/photo2.jpg,in/painting.png,b.png",
        "in/photo.png,in/painting.png,c.png",
        "in/photo2.jpg,in/painting.png,d.png",
    )
    cache = tmp_path / "cache"
    first = cli("run", manifest, *FAST, "--cache-dir", cache)
    assert first.exit_code == 0, first.output
    records = read_records(tmp_path / "m")[0]
    style = [r.targets.split("style=")[1] for r in records]
    content = [r.targets.split()[0] for r in records]
    assert style.count("miss") == 1 and style.count("hit") == 3
    assert content.count("content=miss") == 2 and content.count("content=hit") == 2
    info = json.loads(cli("cache", "info", "--json", "--cache-dir", cache).stdout)
    assert info["by_role"]["style"]["entries"] == 1 and info["by_role"]["content"]["entries"] == 2

    again = cli("run", manifest, *FAST, "--cache-dir", cache, "--force")
    assert again.exit_code == 0, again.output
    assert {r.targets for r in read_records(tmp_path / "m")[0]} == {"content=hit style=hit"}
    info = json.loads(cli("cache", "info", "--json", "--cache-dir", cache).stdout)
    assert info["entries"] == 3, "a rerun adds no entry"


def test_a_corrupt_cache_file_does_not_fail_the_row(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "in/photo.png,in/painting.png,a.png")
    cache = tmp_path / "cache"
    assert cli("run", manifest, *FAST, "--cache-dir", cache).exit_code == 0
    for path in (cache / "targets").glob("*/*.safetensors"):
        path.write_bytes(path.read_bytes()[:100])
    result = cli("run", manifest, *FAST, "--cache-dir", cache, "--force")
    assert result.exit_code == 0, result.output
    assert read_records(tmp_path / "m")[0][0].targets == "content=miss style=miss"


def test_cache_clear_empties_it(tmp_path: Path, images: dict[str, Path]) -> None:
    manifest = write_manifest(tmp_path / "m.csv", "content,style", "in/photo.png,in/painting.png")
    cache = tmp_path / "cache"
    assert cli("run", manifest, *FAST, "--cache-dir", cache).exit_code == 0
    assert "removed 2 cached targets" in cli("cache", "clear", "--cache-dir", cache).stdout
    assert json.loads(cli("cache", "info", "--json", "--cache-dir", cache).stdout)["entries"] == 0
    assert not list((cache / "targets").glob("*/*.safetensors"))


def test_a_cpu_session_on_a_gpu_device_binds_host_memory(random_weights, spec, graph: Path, tmp_path: Path) -> None:
    """A CPU-only onnxruntime on a CUDA host must not be handed CUDA pointers."""
    backend = OrtBackend(graph, spec, random_weights.arch, torch.device("cuda:0"), tmp_path)
    assert backend.io_device == torch.device("cpu")


def test_a_failed_export_falls_back_to_torch_targets(tmp_path: Path, images: dict[str, Path], monkeypatch) -> None:
    from batchstyle.model import export

    def broken(graph, spec, path):  # noqa: ANN001, ANN202 - an exporter that cannot export this graph
        raise RuntimeError("unsupported operator")

    monkeypatch.setitem(export.EXPORTERS, "dynamo", broken)
    monkeypatch.setitem(export.EXPORTERS, "legacy", broken)
    manifest = write_manifest(tmp_path / "m.csv", "content,style,output", "in/photo.png,in/painting.png,a.png")
    result = cli("run", manifest, *FAST, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert read_records(tmp_path / "m")[0][0].provider == "torch:cpu"


def test_the_tensorrt_profile_spans_every_image_of_the_run_at_every_scale(tmp_path: Path) -> None:
    from batchstyle.manifest import read_manifest
    from batchstyle.run.plan import plan
    from batchstyle.run.resources import shape_profile

    Image.new("RGB", (400, 300), "gray").save(tmp_path / "wide.png")
    Image.new("RGB", (300, 600), "gray").save(tmp_path / "tall.png")
    Image.new("RGB", (500, 500), "red").save(tmp_path / "style.png")
    manifest = write_manifest(
        tmp_path / "m.csv",
        "content,style,size,min_size,style_scale",
        "wide.png,style.png,512,256,1",
        "tall.png,style.png,300,0,0.5",
    )
    read = read_manifest(manifest, default_values())
    jobs, _ = plan(read, SOURCES["random"])
    low, common, high = shape_profile(jobs, read.image_sizes)
    # wide at 256/362/512 -> heights 192/272/384; tall at 300 -> 150x300; styles square at each long side and at 150.
    assert low == (150, 150) and high == (512, 512)
    assert low <= common <= high
