"""Benchmarks that print figures: how close an optimisation iteration comes to the network's own cost.

The floor is one bare forward+backward of the same truncated trunk at the same size: no iteration can be cheaper,
so the ratio iteration/floor is what the loop's own overhead (losses, Gram matrices, optimiser) costs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchstyle.features import VGGFeatures
from batchstyle.optimize import stylize
from batchstyle.options import Settings, default_values, make_settings
from batchstyle.targets import compute_targets
from batchstyle.weights import Weights


@dataclass(frozen=True)
class IterationFigures:
    size: tuple[int, int]
    optimizer: str
    seconds_per_iteration: float
    floor_seconds: float

    @property
    def ratio(self) -> float:
        return self.seconds_per_iteration / self.floor_seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def iteration_figures(
    weights: Weights, long_side: int, optimizer: str = "lbfgs", iterations: int = 10, device: str = "cpu"
) -> IterationFigures:
    """Median seconds of one optimisation iteration and of the bare forward+backward floor, 4:3 image."""
    dev = torch.device(device)
    settings: Settings = make_settings({**default_values(), "size": long_side, "optimizer": optimizer})
    taps = (*settings.content_layers, *settings.style_layers)
    model = VGGFeatures(weights.arch, weights.state_dict, weights.preprocess, taps).to(dev)
    h, w = long_side * 3 // 4, long_side
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(1, 3, h, w, generator=gen).to(dev)
    style = torch.rand(1, 3, h, w, generator=gen).to(dev)
    targets = compute_targets(model, content, [style], [1.0], settings.content_layers, settings.style_layers)
    pixels = content.clone().requires_grad_(True)

    def bare() -> None:
        feats = model(pixels)
        deepest = feats[max(feats, key=lambda name: list(model.layers).index(name))]
        deepest.sum().backward()
        pixels.grad = None

    floor = _median_seconds(bare, iterations, dev)
    stamps: list[float] = []

    def stamp(_: int, __: object) -> None:
        _sync(dev)
        stamps.append(time.perf_counter())

    # Timed between iteration callbacks: set-up and the final loss evaluation stay out of the figure.
    stylize(model, content, targets, make_settings({**settings.as_dict(), "iterations": iterations + 1}), None, stamp)
    per_iteration = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    return IterationFigures((w, h), optimizer, per_iteration, floor)
