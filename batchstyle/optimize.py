"""The pixel optimisation loop: the image is the only parameter; the network and the targets stay fixed.

L-BFGS is stepped one iteration per call (its history lives in the optimiser state across calls), so every
iteration costs exactly one forward+backward, and progress, interruption and per-iteration losses come for free.
"""

from __future__ import annotations

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
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]
    iterations: int
    losses: Losses
    history: list[Losses] = field(default_factory=list)


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


def stylize(
    model: VGGFeatures,
    content: torch.Tensor,
    targets: Targets,
    settings: Settings,
    init_image: torch.Tensor | None = None,
    on_iteration: OnIteration | None = None,
) -> Outcome:
    """Optimises the pixels for `settings.iterations` iterations and returns the final image and losses."""
    torch.manual_seed(settings.seed)
    objective = Objective(model, targets, settings).to(content.device)
    pixels = initial_image(settings.init, content, settings.seed, init_image).contiguous().requires_grad_(True)
    lr = settings.step_size()
    if settings.optimizer == "lbfgs":
        optimizer: torch.optim.Optimizer = torch.optim.LBFGS([pixels], lr=lr, max_iter=1, history_size=100)
    else:
        optimizer = torch.optim.Adam([pixels], lr=lr)

    history: list[Losses] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total, c, s, t = objective(pixels)
        loss = total.sum()
        loss.backward()
        history.append(_losses(total, c, s, t))
        return loss

    for i in range(settings.iterations):
        optimizer.step(closure)
        with torch.no_grad():
            pixels.clamp_(0, 1)
        if on_iteration is not None:
            on_iteration(i + 1, history[-1])

    with torch.no_grad():
        total, c, s, t = objective(pixels)
    final = _losses(total, c, s, t)
    return Outcome(pixels.detach(), settings.iterations, final, history)
