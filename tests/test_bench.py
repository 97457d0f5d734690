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
