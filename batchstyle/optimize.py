"""The pixel optimisation loop: the image is the only parameter; the network and the targets stay fixed.

L-BFGS is stepped one iteration per call (its history lives in the optimiser state across calls), so every
iteration costs exactly one forward+backward, and progress, interruption and per-iteration losses come for free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from batchstyle.features import VGGFeatures
from batchstyle.losses import ContentLoss, StyleLoss, TVLoss
from batchstyle.options import Settings
from batchstyle.targets import Targets


@dataclass(frozen=True)
class Losses:
    content: float
    style: float
    tv: float
    total: float


@dataclass
class Outcome:
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]: the lowest-loss iterate
    iterations: int
    losses: Losses  # of that image
    history: list[Losses] = field(default_factory=list)
    kept_iteration: int = 0  # which iterate was kept (0 = the start, iterations = the last)


OnIteration = Callable[[int, Losses], None]


class Objective(nn.Module):
    """alpha * content + beta * style + tv_weight * TV, with per-layer weights; one value per image."""

    def __init__(self, model: VGGFeatures, targets: Targets, settings: Settings) -> None:
        super().__init__()
        self.model = model
        self.content = nn.ModuleDict({name: ContentLoss(t) for name, t in targets.content.items()})
        self.style = nn.ModuleDict({name: StyleLoss(t) for name, t in targets.style.items()})
        self.tv = TVLoss()
        self.content_layer_weight = 1.0 / max(1, len(self.content))
        self.style_layer_weights = dict(zip(settings.style_layers, settings.normalised_style_layer_weights()))
        self.weights = (settings.content_weight, settings.style_weight, settings.tv_weight)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.model(pixels)
        content = sum(self.content_layer_weight * loss(feats[name]) for name, loss in self.content.items())
        style = sum(self.style_layer_weights[name] * loss(feats[name]) for name, loss in self.style.items())
        zero = pixels.new_zeros(pixels.shape[0])
        content = content if isinstance(content, torch.Tensor) else zero
        style = style if isinstance(style, torch.Tensor) else zero
        tv = self.tv(pixels)
        a, b, c = self.weights
        return a * content + b * style + c * tv, content, style, tv


def _losses(total: torch.Tensor, content: torch.Tensor, style: torch.Tensor, tv: torch.Tensor) -> Losses:
    # One host transfer for all four numbers: each .item() would be its own device synchronisation.
    values = torch.stack([content.sum(), style.sum(), tv.sum(), total.sum()]).detach().cpu().tolist()
    return Losses(*values)


def initial_image(init: str, content: torch.Tensor, seed: int, init_image: torch.Tensor | None) -> torch.Tensor:
    if init == "content":
        return content.clone()
    if init == "noise":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(content.shape, generator=gen).to(content.device)
    if init_image is None:
        raise ValueError(f"init {init!r} needs its image")
    return torch.nn.functional.interpolate(init_image, size=content.shape[-2:], mode="bicubic").clamp(0, 1)


LBFGS_HISTORY_BYTES = 1 << 30


def lbfgs_history(numel: int) -> int:
    """L-BFGS correction pairs: 100 (neural-style's choice) while they fit in 1 GiB, fewer for big images.

    Each pair holds two image-sized float32 vectors, so at 2048x1536 a history of 100 alone takes 7.5 GB, more than
    the network's activations; 14 pairs there keep the curvature estimate and bound the memory.
    """
    return max(5, min(100, LBFGS_HISTORY_BYTES // (2 * 4 * numel)))


def scale_sizes(min_size: int, size: int) -> list[int]:
    """Long sides for coarse-to-fine: from min_size up to size in steps of about sqrt(2) (each scale doubles the
    pixel count), so every scale starts from an upsampled image that is already close to its own optimum."""
    if not min_size or min_size >= size:
        return [size]
    steps = max(1, math.ceil(math.log(size / min_size) / math.log(math.sqrt(2)) - 1e-9))
    return [round(min_size * (size / min_size) ** (i / steps)) for i in range(steps + 1)]


def upsample(image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The previous scale's result at the next scale's size: the warm start of coarse-to-fine."""
    return torch.nn.functional.interpolate(image, size=like.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


def stylize(
    model: VGGFeatures,
    content: torch.Tensor,
    targets: Targets,
    settings: Settings,
    init_image: torch.Tensor | None = None,
    on_iteration: OnIteration | None = None,
    start: torch.Tensor | None = None,
    on_snapshot: Callable[[int, torch.Tensor], None] | None = None,
    snapshot_every: int = 0,
) -> Outcome:
    """Optimises the pixels for `settings.iterations` iterations.

    Returns the iterate with the lowest total loss, not simply the last: L-BFGS without a line search and Adam can
    both end on a step that went uphill, and the lowest-loss image is by definition the best fit to the targets
    (averaging late iterates would blur exactly the texture the style loss asks for). `start` overrides
    `settings.init` (a warm start from a coarser scale); `on_snapshot` gets every `snapshot_every`-th iterate.
    """
    torch.manual_seed(settings.seed)
    objective = Objective(model, targets, settings).to(content.device)
    first = start if start is not None else initial_image(settings.init, content, settings.seed, init_image)
    pixels = first.detach().clone().contiguous().requires_grad_(True)
    lr = settings.step_size()
    if settings.optimizer == "lbfgs":
        optimizer: torch.optim.Optimizer = torch.optim.LBFGS(
            [pixels], lr=lr, max_iter=1, history_size=lbfgs_history(pixels.numel())
        )
    else:
        optimizer = torch.optim.Adam([pixels], lr=lr)

    history: list[Losses] = []
    best: tuple[float, int, torch.Tensor] = (math.inf, 0, pixels.detach())

    def closure() -> torch.Tensor:
        nonlocal best
        optimizer.zero_grad(set_to_none=True)
        total, c, s, t = objective(pixels)
        loss = total.sum()
        loss.backward()
        losses = _losses(total, c, s, t)
        history.append(losses)
        # The closure sees the iterate before this step: history[k] is the loss of iterate k.
        if losses.total < best[0]:
            best = (losses.total, len(history) - 1, pixels.detach().clone())
        return loss

    for i in range(settings.iterations):
        optimizer.step(closure)
        with torch.no_grad():
            pixels.clamp_(0, 1)
        if on_iteration is not None:
            on_iteration(i + 1, history[-1])
        if on_snapshot is not None and snapshot_every and (i + 1) % snapshot_every == 0:
            on_snapshot(i + 1, pixels.detach())

    with torch.no_grad():
        total, c, s, t = objective(pixels)
    final = _losses(total, c, s, t)
    if final.total <= best[0]:
        return Outcome(pixels.detach(), settings.iterations, final, history, settings.iterations)
    return Outcome(best[2], settings.iterations, history[best[1]], history, best[1])
