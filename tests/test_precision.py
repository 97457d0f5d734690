"""`--precision auto` decides by measuring: the rule on timings passed in, and the decision kept and reused."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from batchstyle.model.features import VGGFeatures
from batchstyle.model.precision import (
    MARGIN,
    Decision,
    choose,
    decision_path,
    measure,
    precision_decision,
)
from batchstyle.model.weights import resolve

CPU = torch.device("cpu")


def test_a_lower_precision_is_chosen_only_when_clearly_faster() -> None:
    assert choose({"fp32": 1.0, "bf16": 0.5}) == "bf16"  # a Zen 4: about half the time
    assert choose({"fp32": 0.37, "bf16": 1.31}) == "fp32"  # a Xeon without AMX: 3.5x slower
    assert choose({"fp32": 1.0, "bf16": 0.95}) == "fp32"  # within the margin: not worth the precision given up
    assert choose({"fp32": 1.0, "bf16": MARGIN}) == "bf16"  # at the margin exactly
    assert choose({"fp32": 1.0, "tf32": 0.2}) == "tf32"  # a GPU's TF32 convolutions


class Probe:
    """A measurement that counts its calls and returns the timings it was given."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.calls = 0

    def __call__(self, candidates: Sequence[str]) -> dict[str, float]:
        self.calls += 1
        assert tuple(candidates) == ("fp32", "bf16")
        return {name: self.seconds[name] for name in candidates}


def test_the_decision_is_recorded_and_reused_without_measuring_again(tmp_path: Path) -> None:
    probe = Probe({"fp32": 0.37, "bf16": 1.31})
    first = precision_decision(CPU, "auto", "vgg16", tmp_path, probe)
    assert (first.chosen, first.measured, probe.calls) == ("fp32", True, 1)
    assert decision_path(tmp_path, CPU, "vgg16").is_file()
    assert "bf16 1310 ms" in first.describe() and "fp32 370 ms" in first.describe()

    again = precision_decision(CPU, "auto", "vgg16", tmp_path, probe)
    assert (again.chosen, again.measured, probe.calls) == ("fp32", False, 1)
    assert again.seconds == first.seconds
    assert "measured earlier" in again.describe()

    # Another trunk is another decision: its convolutions differ.
    other = precision_decision(CPU, "auto", "vgg19", tmp_path, Probe({"fp32": 1.0, "bf16": 0.5}))
    assert other.chosen == "bf16"


def test_an_unreadable_decision_is_measured_again(tmp_path: Path) -> None:
    path = decision_path(tmp_path, CPU, "vgg16")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    probe = Probe({"fp32": 1.0, "bf16": 0.5})
    assert precision_decision(CPU, "auto", "vgg16", tmp_path, probe).chosen == "bf16"
    assert probe.calls == 1


def test_bf16_asked_for_runs_but_says_this_machine_measured_it_slower(tmp_path: Path) -> None:
    slow = precision_decision(CPU, "bf16", "vgg16", tmp_path, Probe({"fp32": 0.37, "bf16": 1.31}))
    assert (slow.chosen, slow.fastest, slow.slower) == ("bf16", "fp32", True)
    fast = precision_decision(CPU, "bf16", "vgg16", tmp_path / "zen4", Probe({"fp32": 1.0, "bf16": 0.5}))
    assert (fast.chosen, fast.slower) == ("bf16", False)
    plain = precision_decision(CPU, "fp32", "vgg16", tmp_path, Probe({"fp32": 0.37, "bf16": 1.31}))
    assert (plain.chosen, plain.slower) == ("fp32", False)


def test_devices_with_one_candidate_measure_nothing(tmp_path: Path) -> None:
    decision = precision_decision(torch.device("mps"), "auto", "vgg16", tmp_path, Probe({}))
    assert decision == Decision(decision.device, "fp32", "fp32")
    assert not (tmp_path / "precision").exists()


def test_unknown_precision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16"):
        precision_decision(CPU, "fp16", "vgg16", tmp_path, Probe({}))


def test_the_probe_times_the_real_trunk_in_each_candidate(tmp_path: Path) -> None:
    """The measurement itself, on a small random trunk with a counting clock: each candidate gets its warm-ups
    and its timed passes, and the fastest of what the clock said is kept."""
    source, _ = resolve("random", tmp_path)
    weights = source.load(tmp_path)
    trunk = VGGFeatures(weights.arch, weights.state_dict, weights.preprocess, ("relu1_1", "relu2_1"))
    ticks = iter(range(1000))
    seconds = measure(trunk, CPU, ("fp32", "bf16"), side=16, repeats=3, clock=lambda: float(next(ticks)))
    assert seconds == {"fp32": 1.0, "bf16": 1.0}  # each pass reads the clock twice, one tick apart
    assert next(ticks) == 20  # two candidates x (2 warm-ups + 3 timed) passes x 2 readings
