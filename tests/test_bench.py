"""The benchmarks' code paths, run on the CPU at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli

from batchstyle.bench import precisions_to_measure


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
    assert float(bf16[6]) > 0


def test_precisions_to_measure_start_with_fp32_and_resolve_auto() -> None:
    assert precisions_to_measure(torch.device("cuda:0")) == ["fp32", "tf32", "bf16"]
    assert precisions_to_measure(torch.device("cpu")) == ["fp32", "bf16"]
    assert precisions_to_measure(torch.device("mps")) == ["fp32"]
    assert precisions_to_measure(torch.device("cpu"), "bf16,fp32") == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="fp8"):
        precisions_to_measure(torch.device("cpu"), "fp8")


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
