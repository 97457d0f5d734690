"""The benchmarks' code paths, run on the CPU at tiny sizes: `bench device` must work the day a GPU is lent, and
everything it does that is not GPU-only runs here; what is GPU-only it must skip, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli

from batchstyle.bench import PEAK_TFLOPS, iteration_flops, peak_tflops, precisions_to_measure
from batchstyle.model.layout import conv_flops
from batchstyle.options import default_values, make_settings


@pytest.mark.slow
def test_bench_device_on_a_cpu_measures_what_makes_sense_and_says_what_it_skipped(tmp_path: Path) -> None:
    result = cli(
        "bench", "device", "--devices", "cpu", "--model", "random", "--size", "32", "--iterations", "2",
        "--timed", "1", "--batch", "1,2", "--peak-tflops", "1", "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    out = result.output
    assert result.exit_code == 0, out
    for section in (
        "1. seconds per L-BFGS iteration",
        "2. one 32x24 image",
        "3. images per hour",
        "4. cudnn",
        "5.",
        "6.",
    ):
        assert section in out, section
    table = [line.split() for line in out.splitlines() if line.strip().startswith("32x24")]
    assert [(row[1], row[2]) for row in table][:1] == [("1", "fp32")]  # fp32 first: its floor is the yardstick
    assert {row[1] for row in table} == {"1", "2"}
    assert "images/hour" in out and "batch 1:" in out
    assert "CPU fp32" in out  # ONNX Runtime's CPU provider against torch
    # The GPU-only figures are skipped with their reasons, and listed at the end.
    assert "skipped tf32: TF32 exists on NVIDIA GPUs only" in out
    assert "skipped cudnn.benchmark: cuDNN runs on NVIDIA GPUs only" in out
    assert "skipped targets on CUDA and TensorRT: no CUDA device" in out
    assert "skipped auto batch" in out
    assert "\nskipped " in out
    # --peak-tflops stands in for the table: the share of peak is printed, not skipped.
    assert "share of peak" not in out.split("\nskipped ")[-1]


def test_bench_device_skips_what_the_budget_has_no_time_for(tmp_path: Path) -> None:
    result = cli(
        "bench", "device", "--devices", "cpu", "--model", "random", "--size", "32", "--iterations", "2",
        "--budget", "0", "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the time budget is spent" in result.output
    assert "s/iteration;" not in result.output  # nothing was timed


@pytest.mark.slow
def test_bench_iteration_prints_each_precision_beside_the_fp32_floor(tmp_path: Path) -> None:
    result = cli(
        "bench", "iteration", "--model", "random", "--sizes", "32", "--batch", "1", "--iterations", "1",
        "--device", "cpu", "--precisions", "bf16", "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip().startswith("32x24")]
    assert [row[2] for row in rows] == ["fp32", "bf16"]
    fp32, bf16 = rows
    assert float(fp32[6]) == pytest.approx(float(fp32[5]), rel=1e-2)  # fp32 against its own floor: the same ratio
    # Each ratio is its row's seconds over the right floor: bf16's own for "ratio", fp32's for "/fp32 floor" (here
    # 2.19 against 1.56 over its own floor, so a column against the wrong floor fails).
    seconds, floor, fp32_floor = float(bf16[3]), float(bf16[4]), float(fp32[4])
    assert_quotient(float(bf16[5]), seconds, floor)
    assert_quotient(float(bf16[6]), seconds, fp32_floor)
    assert float(bf16[7]) == seconds  # batch 1: per image is per iteration


def assert_quotient(printed: float, numerator: float, denominator: float) -> None:
    """`printed` (to 3 decimals) is numerator / denominator, both printed to 4 decimals: it lies in the interval
    their rounding leaves open."""
    half = 0.5e-4
    low, high = (numerator - half) / (denominator + half), (numerator + half) / (denominator - half)
    assert low - 5e-4 <= printed <= high + 5e-4, (printed, low, high)


def test_precisions_to_measure_start_with_fp32_and_resolve_auto() -> None:
    assert precisions_to_measure(torch.device("cuda:0")) == ["fp32", "tf32", "bf16"]
    assert precisions_to_measure(torch.device("cpu")) == ["fp32", "bf16"]
    assert precisions_to_measure(torch.device("mps")) == ["fp32"]
    assert precisions_to_measure(torch.device("cpu"), "bf16,fp32") == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="fp8"):
        precisions_to_measure(torch.device("cpu"), "fp8")


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "fp32", 67.0),
        ("NVIDIA A100-SXM4-40GB", "tf32", 156.0),
        ("NVIDIA A10", "tf32", 62.5),
        ("NVIDIA L40S", "bf16", 362.1),
        ("NVIDIA L4", "bf16", 121.0),
        ("Tesla T4", "tf32", None),  # no TF32 on Turing
        ("NVIDIA GeForce RTX 4090", "tf32", None),  # not in the table: --peak-tflops
    ],
)
def test_peak_is_looked_up_by_device_name(name: str, precision: str, expected: float | None) -> None:
    assert peak_tflops(name, precision) == expected


def test_the_table_and_the_flop_count() -> None:
    assert all(set(peaks) <= {"fp32", "tf32", "bf16"} for peaks in PEAK_TFLOPS.values())
    # VGG-16's convolutions at 224x224: the published 15.5 GMACs (30.7 GFLOPs), less its classifier.
    assert conv_flops("vgg16", "relu5_3", 224, 224) == pytest.approx(30.69e9, rel=1e-3)
    assert conv_flops("vgg19", "relu5_4", 224, 224) == pytest.approx(39.02e9, rel=1e-3)
    settings = make_settings(default_values())  # deepest tap relu5_1
    assert iteration_flops("vgg19", settings, 512, 384, batch=2) == 4 * conv_flops("vgg19", "relu5_1", 384, 512)


def test_seconds_per_iteration_on_a_gpu_come_from_whole_bursts() -> None:
    """On a GPU the loop reports its losses every LOSS_CHUNK iterations, all of a burst at its end: the time per
    iteration is between the ends of bursts, and the first (warm-up) burst is left out. Timed here with made-up
    report times, as a GPU would produce them: 0.01 s per iteration, 0.5 s of warm-up."""
    from batchstyle.bench import _loop_iterations, _per_iteration
    from batchstyle.model.optimize import LOSS_CHUNK

    gpu = torch.device("cuda:0")
    n = _loop_iterations(gpu, 10)
    assert n % LOSS_CHUNK == 0 and n >= 2 * LOSS_CHUNK
    assert _loop_iterations(torch.device("cpu"), 10) == 11
    bursts = {k: 0.5 + 0.01 * (LOSS_CHUNK * -(-k // LOSS_CHUNK)) for k in range(1, n + 1)}
    assert _per_iteration(bursts, gpu) == pytest.approx(0.01)
    assert _per_iteration({k: bursts[k] for k in range(1, LOSS_CHUNK + 1)}, gpu) is None  # one burst: no figure
    steady = {k: 0.02 * k for k in range(1, 6)}
    assert _per_iteration(steady, torch.device("cpu")) == pytest.approx(0.02)


@pytest.mark.slow
def test_bench_memory_prints_a_row_per_size_and_tiling_and_skips_bad_tilings(tmp_path: Path) -> None:
    common = ("bench", "memory", "--model", "random", "--min-size", "0", "--final-iterations", "1")
    result = cli(*common, "--sizes", "64", "--tilings", "untiled,32,auto", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.strip().startswith("64 ")]
    assert len(rows) == 3
    assert "untiled, 100 pairs" in rows[0] and "tile 32, 100 pairs" in rows[1]
    assert "untiled" in rows[2]  # 64 px fits any budget: auto leaves it whole
    # So auto measured the untiled configuration a second time, in a fresh process: the memory model predicts the
    # same, and the peak comes back within 10% (877 and 880 MiB here; the working part, 240 and 216 MiB, is what
    # varies, and is a small part of the peak at this size).
    untiled, auto = (row.split() for row in (rows[0], rows[2]))
    assert untiled[-3] == auto[-3]  # predicted MiB
    peaks = float(untiled[-5]), float(auto[-5])
    assert max(peaks) < 1.1 * min(peaks), peaks
    refused = cli(*common, "--sizes", "64", "--tilings", "small")
    assert refused.exit_code != 0 and "'small' is not auto, untiled or a tile size" in refused.output
